"""Packaging: the image build context, its runtime contract, the lock, the wheel as installed.

There is no Docker engine here, so the Dockerfile is checked as text, and the
image's install step is replayed outside Docker: the wheel is built from the
files .dockerignore admits, then installed into a fresh venv the way the
builder stage does it (a venv without pip of its own, filled by an outer pip).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from ims_emulator import AEM_CREDENTIALS_FILE, OAUTH_CREDENTIALS_FILE
from tests.support import keys
from tests.support.harness import secret_values
from tests.support.leaks import assert_no_leak

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
RUNTIME_UID = "65532"
SUBCOMMANDS = ("run", "once", "check", "emulator")


# --- Dockerfile as text ---------------------------------------------------------


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, arguments = (pending + line).partition(" ")
        result.append((keyword.upper(), arguments.strip()))
        pending = ""
    return result


def stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's build stages, each starting with its FROM."""
    found: list[list[tuple[str, str]]] = []
    for instruction in instructions(DOCKERFILE.read_text(encoding="utf-8")):
        if instruction[0] == "FROM":
            found.append([])
        if found:
            found[-1].append(instruction)
    return found


def values(stage: list[tuple[str, str]], keyword: str) -> list[str]:
    return [arguments for name, arguments in stage if name == keyword]


def key_values(arguments: str) -> dict[str, str]:
    """ENV/LABEL/ARG `key=value ...` arguments as a dict."""
    return dict(word.split("=", 1) for word in shlex.split(arguments) if "=" in word)


def test_dockerfile_final_stage_runs_refresher_as_nonroot() -> None:
    """The runtime stage runs `refresher run` as UID/GID 65532 and exposes port 9876."""
    final = stages()[-1]
    (user,) = values(final, "USER")
    assert user.split(":") in ([RUNTIME_UID], [RUNTIME_UID, RUNTIME_UID])
    assert [json.loads(v) for v in values(final, "ENTRYPOINT")] == [["refresher"]]
    assert [json.loads(v) for v in values(final, "CMD")] == [["run"]]
    assert values(final, "EXPOSE") == ["9876"]
    # USER comes after every RUN: each RUN before it runs as root, by design.
    keywords = [name for name, _ in final]
    assert keywords.index("USER") > max(i for i, k in enumerate(keywords) if k == "RUN")


def test_dockerfile_runtime_environment_suits_a_read_only_root() -> None:
    """The runtime writes no bytecode, buffers no logs, and sets no TMPDIR outside the token dir."""
    final = stages()[-1]
    env: dict[str, str] = {}
    for arguments in values(final, "ENV"):
        env.update(key_values(arguments))
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1"
    assert env.get("PYTHONUNBUFFERED") == "1"
    assert "TMPDIR" not in env
    # Bytecode is compiled at build time instead (the stdlib here, the venv in the builder).
    assert any("compileall" in run for stage in stages() for run in values(stage, "RUN"))


def test_dockerfile_is_multi_stage_on_a_pinned_slim_python() -> None:
    """A builder stage makes the venv; the runtime copies it and installs nothing itself."""
    all_stages = stages()
    assert len(all_stages) >= 2
    args: dict[str, str] = {}
    for name, arguments in instructions(DOCKERFILE.read_text(encoding="utf-8")):
        if name == "ARG":
            args.update(key_values(arguments))
    for stage in all_stages:
        base = stage[0][1].split()[0]
        base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
        # A full reference: builders that do not guess registries (buildah,
        # podman) pull it as written, and the base.name label names it exactly.
        assert re.fullmatch(
            r"docker\.io/library/python:3\.1[1-9]\.\d+-slim(-\w+)?(@sha256:[0-9a-f]{64})?", base
        ), base
    final = all_stages[-1]
    assert any(c.startswith("--from=") for c in values(final, "COPY")), "nothing copied in"
    for run in values(final, "RUN"):
        assert not re.search(r"\bpip\b.*\binstall\b|apt-get|\bgcc\b", run), run
    # The build context is only what .dockerignore admits; tests never reach the image.
    assert not any("tests" in c for stage in all_stages for c in values(stage, "COPY"))


def test_dockerfile_has_oci_labels() -> None:
    """The image carries the standard org.opencontainers.image.* labels."""
    labels: dict[str, str] = {}
    for arguments in values(stages()[-1], "LABEL"):
        labels.update(key_values(arguments))
    for key in ("title", "description", "version", "revision", "licenses", "source"):
        assert labels.get(f"org.opencontainers.image.{key}"), key


def test_dockerfile_base_label_follows_the_python_image_argument() -> None:
    """base.name is the PYTHON_IMAGE actually used, re-declared in the runtime stage."""
    final = stages()[-1]
    labels: dict[str, str] = {}
    for arguments in values(final, "LABEL"):
        labels.update(key_values(arguments))
    assert labels["org.opencontainers.image.base.name"] == "${PYTHON_IMAGE}"
    names = [name for name, _ in final]
    assert ("ARG", "PYTHON_IMAGE") in final, "PYTHON_IMAGE is not re-declared in the runtime stage"
    assert final.index(("ARG", "PYTHON_IMAGE")) < names.index("LABEL")


def test_dockerfile_system_account_allows_uid_65532() -> None:
    """useradd/groupadd raise SYS_UID_MAX/SYS_GID_MAX, so 65532 is made without a warning."""
    (run,) = [r for r in values(stages()[-1], "RUN") if "useradd" in r]
    assert re.search(r"useradd [^&]*-K SYS_UID_MAX=65532", run), run
    assert re.search(r"groupadd [^&]*-K SYS_GID_MAX=65532", run), run


def test_dockerfile_installs_only_locked_hashed_dependencies() -> None:
    """Every pip install in the build takes the lock with --require-hashes, or the
    project's own wheel with --no-deps; no build step downloads anything unhashed."""
    builder = stages()[0]
    copied = " ".join(values(builder, "COPY"))
    assert "requirements/runtime.txt" in copied and "requirements/build.txt" in copied
    installs = [
        command
        for run in values(builder, "RUN")
        for command in run.split("&&")
        if re.search(r"\bpip\b.*\b(install|wheel)\b", command)
    ]
    assert installs
    for command in installs:
        locked = "--require-hashes" in command and re.search(r"-r requirements/\w+\.txt", command)
        local = "--no-deps" in command and (
            "/dist/" in command or "--no-build-isolation" in command
        )
        assert locked or local, command


# --- the lock ----------------------------------------------------------------------

REQUIREMENTS = ROOT / "requirements"


def _locked(name: str) -> dict[str, Requirement]:
    """The pins of requirements/<name>.txt by normalized project name."""
    text = (REQUIREMENTS / f"{name}.txt").read_text(encoding="utf-8")
    entries = re.sub(r"\\\n\s*", " ", text).splitlines()
    pins: dict[str, Requirement] = {}
    for entry in entries:
        if not entry.strip() or entry.lstrip().startswith("#"):
            continue
        requirement, *hashes = entry.split(" --hash=")
        assert hashes and all(h.startswith("sha256:") for h in hashes), entry
        parsed = Requirement(requirement.strip())
        assert len(parsed.specifier) == 1 and next(iter(parsed.specifier)).operator == "==", entry
        pins[canonicalize_name(parsed.name)] = parsed
    return pins


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


@pytest.mark.parametrize(
    ("lock", "section"),
    [("runtime", "dependencies"), ("test", "dependencies"), ("test", "test"), ("build", "build")],
)
def test_lock_pins_every_declared_requirement(lock: str, section: str) -> None:
    """Each requirement of pyproject.toml is pinned, with hashes, at a version it allows:
    a dependency added without `make lock` fails here."""
    project = _pyproject()
    declared = {
        "dependencies": project["project"]["dependencies"],
        "test": project["project"]["optional-dependencies"]["test"],
        "build": project["build-system"]["requires"],
    }[section]
    pins = _locked(lock)
    for text in declared:
        wanted = Requirement(text)
        pin = pins.get(canonicalize_name(wanted.name))
        assert pin, f"{wanted.name} is not in requirements/{lock}.txt: run make lock"
        version = next(iter(pin.specifier)).version
        assert wanted.specifier.contains(version, prereleases=True), (
            f"requirements/{lock}.txt pins {pin}, outside {wanted}: run make lock"
        )


def test_test_lock_agrees_with_the_runtime_lock() -> None:
    """The tests run the very versions the image ships."""
    runtime, test = _locked("runtime"), _locked("test")
    assert {name: str(test[name]) for name in runtime} == {n: str(r) for n, r in runtime.items()}


def test_lock_says_how_to_refresh_it() -> None:
    """Each lock file names `make lock` as the command that wrote it."""
    for name in ("runtime", "build", "test"):
        head = (REQUIREMENTS / f"{name}.txt").read_text(encoding="utf-8")[:200]
        assert "make lock" in head, name


# --- .dockerignore --------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Docker's .dockerignore glob: `*` and `?` stay within a path segment, `**` spans them."""
    pattern = pattern.strip("/")
    out = ""
    index = 0
    while index < len(pattern):
        if pattern.startswith("**/", index):
            out += "(?:.*/)?"
            index += 3
        elif pattern.startswith("**", index):
            out += ".*"
            index += 2
        elif pattern[index] == "*":
            out += "[^/]*"
            index += 1
        elif pattern[index] == "?":
            out += "[^/]"
            index += 1
        elif pattern[index] == "[":
            end = pattern.index("]", index)
            out += pattern[index : end + 1]
            index = end + 1
        else:
            out += re.escape(pattern[index])
            index += 1
    return re.compile(out)


def dockerignore_rules() -> list[tuple[bool, str, re.Pattern[str]]]:
    """(negated, pattern, regex) for each .dockerignore line, in order."""
    rules = []
    for raw in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pattern = line.removeprefix("!")
        rules.append((line.startswith("!"), pattern, _pattern_regex(pattern)))
    return rules


def in_build_context(path: str) -> bool:
    """Whether Docker sends `path` to the builder: the last matching rule wins, and a
    rule matching a parent directory matches everything below it."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    included = True
    for negated, _, regex in dockerignore_rules():
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            included = negated
    return included


@pytest.mark.parametrize(
    "path",
    [
        "pyproject.toml",
        "README.md",
        "refresher/__init__.py",
        "refresher/py.typed",
        "refresher/sinks/file.py",
        "ims_emulator/__init__.py",
        "requirements/runtime.txt",
        "requirements/build.txt",
    ],
)
def test_build_context_holds_what_the_wheel_needs(path: str) -> None:
    """.dockerignore admits the packages, the files their metadata names and the lock."""
    assert in_build_context(path)


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        ".git/HEAD",
        "tests/deploy/test_packaging.py",
        "bench/run.py",
        "docs/deploying.md",
        "manifests/examples/sidecar/deployment.yaml",
        "refresher/__pycache__/cli.cpython-312.pyc",
        "refresher/sinks/__pycache__/file.pyc",
        ".pytest_cache/README.md",
        ".ruff_cache/x",
        ".mypy_cache/x",
        "build/lib/refresher/cli.py",
        "dist/ims_token_refresher-0.1.0-py3-none-any.whl",
        "ims_token_refresher.egg-info/PKG-INFO",
        "credentials.json",
        "requirements/test.txt",
        "charts/ims-token-refresher/values.yaml",
    ],
)
def test_build_context_leaves_out_the_rest(path: str) -> None:
    """.dockerignore keeps venvs, VCS data, tests, docs, caches and stray secrets out."""
    assert not in_build_context(path)


# --- the wheel, installed as the image installs it --------------------------------


def _clean_env() -> dict[str, str]:
    # A REFRESHER_* variable from the developer's shell would change the CLI's
    # answer (an unknown one is even an error): the installed CLI sees none.
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFRESHER_")}
    env.pop("PYTHONPATH", None)
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _copy_build_context(destination: Path) -> None:
    """Copy the files .dockerignore admits, as `docker build` would send them."""
    reincluded = [pattern for negated, pattern, _ in dockerignore_rules() if negated]
    for directory, subdirectories, files in os.walk(ROOT):
        relative = Path(directory).relative_to(ROOT)
        # Do not descend into excluded trees (.venv, .git) unless a `!` rule
        # could admit something inside them.
        subdirectories[:] = [
            name
            for name in subdirectories
            if in_build_context((relative / name).as_posix())
            or any(p.startswith(f"{(relative / name).as_posix()}/") for p in reincluded)
        ]
        for name in files:
            path = relative / name
            if in_build_context(path.as_posix()):
                (destination / path).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / path, destination / path)


def _build_and_install(root: Path) -> None:
    """Build the wheel from the build context into root/dist, install it into root/venv."""
    context, dist, venv = root / "context", root / "dist", root / "venv"
    _copy_build_context(context)
    result = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(context)],
        capture_output=True,
        text=True,
        timeout=300,
        env=_clean_env(),
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (wheel,) = dist.glob("*.whl")
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120
    )
    # As the image build does: the locked dependencies with their hashes, then
    # the wheel alone, then pip's own consistency check.
    pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python")]
    for command in (
        ["install", "--quiet", "--require-hashes", "-r", str(ROOT / "requirements/runtime.txt")],
        ["install", "--quiet", "--no-deps", str(wheel)],
        ["check"],
    ):
        result = subprocess.run(
            [*pip, *command],
            capture_output=True,
            text=True,
            timeout=600,
            env=_clean_env(),
            check=False,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture(scope="session")
def packaged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding dist/ (the wheel) and venv/ (a fresh venv with the wheel installed).

    Built once per test run: under pytest-xdist the workers share one copy
    through a lock in the run's common temporary directory, so `make test`
    downloads the dependencies once, not once per worker.
    """
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    root = shared / "packaging"
    root.mkdir(exist_ok=True)
    with (root.parent / "packaging.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "done").exists():
            for leftover in root.iterdir():
                shutil.rmtree(leftover)
            _build_and_install(root)
            (root / "done").touch()
    return root


@pytest.fixture
def wheel(packaged: Path) -> Path:
    (built,) = (packaged / "dist").glob("*.whl")
    return built


@pytest.fixture
def installed(packaged: Path) -> Path:
    """The bin directory of the fresh venv."""
    return packaged / "venv" / "bin"


def refresher(bin_dir: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(bin_dir / "refresher"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=_clean_env(),
        cwd=cwd,
        check=False,
    )


@pytest.mark.slow
def test_wheel_ships_type_marker_and_no_tests(wheel: Path) -> None:
    """The wheel carries refresher/py.typed and the console script, and no tests."""
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        scripts = archive.read(entry_points).decode()
    assert "refresher/py.typed" in names
    assert not [n for n in names if n.startswith(("tests/", "bench/", "docs/"))]
    assert re.search(r"^refresher\s*=\s*refresher\.cli:main$", scripts, re.MULTILINE)


@pytest.mark.slow
def test_installed_cli_lists_its_subcommands(installed: Path, tmp_path: Path) -> None:
    """`refresher --help` from the installed wheel exits 0 and names every subcommand."""
    result = refresher(installed, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for subcommand in SUBCOMMANDS:
        assert re.search(rf"\b{subcommand}\b", result.stdout), subcommand


@pytest.mark.slow
@pytest.mark.parametrize(
    ("filename", "flow", "client_id"),
    [
        (OAUTH_CREDENTIALS_FILE, "oauth", keys.OAUTH_CLIENT_ID),
        (AEM_CREDENTIALS_FILE, "jwt", keys.CLIENT_ID),
    ],
    ids=["oauth", "jwt"],
)
def test_installed_check_accepts_valid_credentials(
    installed: Path, tmp_path: Path, filename: str, flow: str, client_id: str
) -> None:
    """`refresher check` exits 0 and reports the flow and client id, never a secret."""
    directory = keys.write_credentials(tmp_path / "credentials")
    path = directory / filename
    result = refresher(installed, "check", "--credentials", str(path), cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    report = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    assert (report["flow"], report["client_id"]) == (flow, client_id)
    assert_no_leak(output, secret_values(directory))


@pytest.mark.slow
def test_installed_check_rejects_missing_credentials(installed: Path, tmp_path: Path) -> None:
    """`refresher check` on a path that does not exist exits 2 (configuration error)."""
    result = refresher(
        installed, "check", "--credentials", str(tmp_path / "absent.json"), cwd=tmp_path
    )
    assert result.returncode == 2, result.stdout + result.stderr
