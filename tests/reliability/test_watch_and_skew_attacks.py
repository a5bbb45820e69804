"""Attacks on three recent changes: the lean watch check (`change_signature`), the clock
skew that follows steps of the node's own clock, and the image without `kubernetes.aio`.

- The watch check is compared with the implementation it replaced (9ff8088, taken from
  git at test time) on random filesystem histories: whatever the old one saw change,
  the new one must see too (and the other way round).
- The skew estimate is driven with an injected epoch (a test may not step the machine's
  clock): its reading must always be the truth for a node whose clock steps, also while
  another thread reads it during observations.
- The Secret sink's client is loaded in a subprocess where `kubernetes.aio` cannot be
  imported, as in the image, and publishes to the fake apiserver on loopback.

Everything is local (tmp dirs, loopback) and bounded.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refresher.credentials import change_signature
from refresher.skew import RESOLUTION_S, SkewEstimate, boot_epoch, significant
from tests.support import keys
from tests.support.fakeapi import FakeApiServer

ROOT = Path(__file__).resolve().parents[2]
OLD_REV = "9ff8088"

Signature = Callable[[str | os.PathLike[str]], tuple[object, ...]]


# ---- 1. the watch check --------------------------------------------------------------


@functools.cache
def _old_module() -> ModuleType:
    """refresher/credentials/volume.py as it was before the lean watch check."""
    source = subprocess.run(
        ["git", "show", f"{OLD_REV}:refresher/credentials/volume.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    directory = Path(tempfile.mkdtemp(prefix="old-volume-"))
    module_path = directory / "old_volume_9ff8088.py"
    module_path.write_text(source, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("old_volume_9ff8088", module_path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def old_signature(path: str | os.PathLike[str]) -> tuple[object, ...]:
    result: tuple[object, ...] = _old_module().change_signature(path)
    return result


def _remove(path: Path) -> None:
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def _become(path: Path, kind: str, serial: int) -> None:
    """Replace whatever `path` is by `kind` (the old one removed first)."""
    _remove(path)
    if kind == "file":
        path.write_text("{}" + " " * serial, encoding="utf-8")
    elif kind == "dir":
        path.mkdir()
        (path / "key.json").write_text("{}", encoding="utf-8")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "dangling":
        path.symlink_to("nowhere-" + str(serial))
    elif kind == "loop":
        path.symlink_to(path.name)
    elif kind == "link-file":
        path.symlink_to(path.parent / "plain.json")
    elif kind == "link-dir":
        path.symlink_to("dirp")
    elif kind == "link-secret":
        path.symlink_to("sec")


NAMES = [
    "plain.json",
    "ln.json",
    "dirp",
    "dirp/k1",
    "sec",
    "sec/creds.json",
    "par",
    "missing.json",
]
# What the loop may be given: a file, a link, a plain directory, a Secret volume and a
# key in it, a key through a parent link that gets retargeted, and a missing file.
WATCHED = [*NAMES, "par/creds.json", "par/k1", "ln.json"]

OPS = st.sampled_from(
    ["edit", "rename-over", "chmod", "utime", "swap", "add-key", "remove", "become"]
)
KINDS = st.sampled_from(
    ["file", "dir", "fifo", "dangling", "loop", "link-file", "link-dir", "link-secret"]
)
STEPS = st.lists(
    st.tuples(OPS, st.sampled_from(NAMES), KINDS, st.integers(0, 3)), min_size=1, max_size=8
)


def _workspace(root: Path) -> None:
    keys.write_json(root / "plain.json", {"a": 1})
    (root / "ln.json").symlink_to("plain.json")
    keys.write_fields(root / "dirp", {"k1": "one", "k2": "two"})
    keys.write_kubelet_secret(root / "sec", {"creds.json": "{}", "k1": "x"}, version=1)
    (root / "par").symlink_to("sec")


def _apply(root: Path, op: str, name: str, kind: str, arg: int, serial: int) -> None:
    path = root / name
    try:
        if op == "edit":
            if path.is_file():  # follows links; never opens a FIFO
                with path.open("a", encoding="utf-8") as handle:
                    handle.write("x" * (arg + 1))
        elif op == "rename-over":
            if not path.is_dir():
                fresh = root / f".fresh-{serial}"
                fresh.write_text("{}" + "y" * arg, encoding="utf-8")
                fresh.replace(path)
        elif op == "chmod":
            os.chmod(path, (0o600, 0o400, 0o700, 0o000)[arg])
        elif op == "utime":
            os.utime(path, ns=(arg * 10**9 + 1, arg * 10**9 + 1))
        elif op == "swap":
            secret = root / "sec"
            if secret.is_dir() and (secret / "..data").is_symlink():
                files = {"creds.json": "{}" + "z" * arg, "k1": "x"}
                if arg % 2:
                    files["extra"] = "e"
                keys.swap_kubelet_secret(secret, files, version=serial + 10)
        elif op == "add-key":
            if path.is_dir():
                (path / f"new-{serial}").write_text("n", encoding="utf-8")
        elif op == "remove":
            _remove(path)
        elif op == "become":
            _become(path, kind, serial)
    except OSError:
        pass  # not possible in this state (e.g. `sec/creds.json` once `sec` is gone)


def _forms(path: Path) -> list[str | os.PathLike[str]]:
    """The path as a Path, as an absolute str and as a relative str."""
    return [path, str(path), os.path.relpath(path)]


@settings(
    max_examples=int(os.environ.get("WATCH_DIFF_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(steps=STEPS)
def test_the_lean_watch_check_sees_every_change_the_old_one_saw(
    steps: list[tuple[str, str, str, int]],
) -> None:
    """Differential: after every random change, old and new say "changed" alike, for every
    watched path in every form (Path, absolute str, relative str)."""
    with tempfile.TemporaryDirectory(prefix="watch-diff-") as tmp:
        root = Path(tmp)
        _workspace(root)
        watched = [root / name for name in WATCHED]
        before = {
            (str(w), i): (old_signature(f), change_signature(f))
            for w in watched
            for i, f in enumerate(_forms(w))
        }
        for serial, (op, name, kind, arg) in enumerate(steps):
            _apply(root, op, name, kind, arg, serial)
            for w in watched:
                for i, form in enumerate(_forms(w)):
                    now = (old_signature(form), change_signature(form))
                    old_changed = now[0] != before[(str(w), i)][0]
                    new_changed = now[1] != before[(str(w), i)][1]
                    assert new_changed == old_changed, (op, name, kind, str(w), i)
                    before[(str(w), i)] = now


def _secret(root: Path) -> Path:
    return keys.write_kubelet_secret(root / "sec", {"creds.json": "{}", "k1": "x"}, version=1)


SCENARIOS: list[tuple[str, str, Callable[[Path], object]]] = [
    (
        "kubelet swap seen by the directory",
        "sec",
        lambda r: keys.swap_kubelet_secret(r / "sec", {"creds.json": "{}", "k1": "x"}, version=2),
    ),
    (
        "kubelet swap seen by a key",
        "sec/creds.json",
        lambda r: keys.swap_kubelet_secret(r / "sec", {"creds.json": "{}", "k1": "x"}, version=2),
    ),
    (
        "a key removed from the Secret",
        "sec",
        lambda r: keys.swap_kubelet_secret(r / "sec", {"creds.json": "{}"}, version=2),
    ),
    ("parent link retargeted", "par/k1", lambda r: _become(r / "par", "link-dir", 0)),
    ("file becomes a directory", "plain.json", lambda r: _become(r / "plain.json", "dir", 0)),
    ("file becomes a FIFO", "plain.json", lambda r: _become(r / "plain.json", "fifo", 0)),
    ("file becomes dangling", "plain.json", lambda r: _become(r / "plain.json", "dangling", 0)),
    ("file becomes a loop", "plain.json", lambda r: _become(r / "plain.json", "loop", 0)),
    ("dangling link retargeted", "dl", lambda r: _become(r / "dl", "dangling", 7)),
    ("loop becomes a file", "lp", lambda r: _become(r / "lp", "file", 0)),
    ("directory chmod", "dirp", lambda r: os.chmod(r / "dirp", 0o500)),
    ("key chmod", "dirp", lambda r: os.chmod(r / "dirp" / "k1", 0o400)),
    ("directory becomes a file", "dirp", lambda r: _become(r / "dirp", "file", 0)),
    ("link to a dir retargeted", "ld", lambda r: _become(r / "ld", "link-secret", 0)),
    ("a key added", "dirp", lambda r: (r / "dirp" / "k3").touch()),
]


@pytest.mark.parametrize(
    ("target", "change"),
    [(t, c) for _, t, c in SCENARIOS],
    ids=[s[0] for s in SCENARIOS],
)
def test_each_kind_of_change_is_seen(
    tmp_path: Path, target: str, change: Callable[[Path], object]
) -> None:
    _workspace(tmp_path)
    (tmp_path / "dl").symlink_to("nowhere")
    (tmp_path / "lp").symlink_to("lp")
    (tmp_path / "ld").symlink_to("dirp")
    os.chmod(tmp_path / "dirp", 0o700)
    path = tmp_path / target
    for form in _forms(path):
        before = change_signature(form)
        assert change_signature(form) == before  # stable while nothing changes
    signatures = [change_signature(form) for form in _forms(path)]
    change(tmp_path)
    for form, signature in zip(_forms(path), signatures, strict=True):
        assert change_signature(form) != signature, repr(form)


@pytest.mark.parametrize(
    "make",
    [
        lambda r: os.mkfifo(r / "x"),
        lambda r: (r / "x").symlink_to("x"),
        lambda r: (r / "x").symlink_to("nowhere"),
        lambda r: (r / "f").write_text("{}", encoding="utf-8"),  # x under a file: ENOTDIR
        lambda r: None,
    ],
    ids=["fifo", "loop", "dangling", "under-a-file", "missing"],
)
@pytest.mark.parametrize(
    "suffix", ["", "/", "/.", "/creds.json", "/" + "n" * 300, "/" + "d/" * 3000]
)
def test_the_watch_check_never_raises(
    tmp_path: Path, make: Callable[[Path], object], suffix: str
) -> None:
    make(tmp_path)
    base = tmp_path / ("f" if (tmp_path / "f").exists() else "x")
    name = str(base) + suffix
    signature = change_signature(name)
    assert signature == change_signature(name)


def _trailing_slash_case(tmp_path: Path, link: bool) -> tuple[str, Path]:
    target = keys.write_json(tmp_path / "creds.json", {"a": 1})
    if link:
        (tmp_path / "current.json").symlink_to("creds.json")
        return str(tmp_path / "current.json") + "/", target
    return str(target) + "/", target


@pytest.mark.parametrize("link", [False, True], ids=["file", "link-to-file"])
def test_a_file_named_with_a_trailing_slash_is_still_watched(tmp_path: Path, link: bool) -> None:
    """Found by attack: a str naming a file with a trailing '/' was ENOTDIR to every stat,
    so no edit was ever seen (9ff8088, through Path, saw it). Now normalised as Path does."""
    name, target = _trailing_slash_case(tmp_path, link)
    old_before, new_before = old_signature(name), change_signature(name)
    target.write_text('{"a": 2, "b": 3}', encoding="utf-8")
    assert old_signature(name) != old_before  # the old check saw the edit
    assert change_signature(name) != new_before


def test_a_trailing_slash_path_is_watched_as_a_path_object(tmp_path: Path) -> None:
    """What the loop actually passes (`Settings.credentials` is a Path, which drops the
    slash): the same file is watched fine that way."""
    name, target = _trailing_slash_case(tmp_path, link=False)
    before = change_signature(Path(name))
    target.write_text('{"a": 2, "b": 3}', encoding="utf-8")
    assert change_signature(Path(name)) != before


# ---- 2. the clock skew ---------------------------------------------------------------

BASE = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def _answer(ims_minus_base_s: int, node_epoch: float) -> tuple[str, datetime, datetime]:
    """A Date header and our two instants for an answer whose sample is exactly
    `ims_minus_base_s - node_epoch` (our clock reads BASE + epoch + 0.5 at the middle)."""
    ours = BASE + timedelta(seconds=node_epoch + 0.5)
    date = format_datetime(BASE + timedelta(seconds=ims_minus_base_s), usegmt=True)
    return date, ours, ours


class Epoch:
    """The node's wall clock minus its boot clock, stepped by the test."""

    def __init__(self) -> None:
        self.value = 0.0

    def __call__(self) -> float:
        return self.value


EPOCH_STEPS = st.lists(
    st.one_of(
        # Steps of whole tens of seconds: an exact sample is then either the estimate itself
        # or more than STEP_S away, and taken whole; never smoothed part of the way.
        st.tuples(st.just("step"), st.integers(-500, 500).map(lambda n: 10 * n)),
        st.tuples(st.just("observe"), st.just(0)),
        st.tuples(st.just("garbled"), st.just(0)),
    ),
    max_size=25,
)


@settings(max_examples=150, deadline=None)
@given(ims_minus_base=st.integers(-3000, 3000), steps=EPOCH_STEPS)
def test_the_estimate_follows_the_steps_that_explain_it(
    ims_minus_base: int, steps: list[tuple[str, int]]
) -> None:
    """IMS's clock is right; the node's clock steps back and forth (`step`), and answers
    arrive now and then (`observe`, an exact sample; `garbled`, no usable Date). After every
    event the reading is the truth (IMS minus ours) when that is closer to 0 than the last
    measured estimate (a step that explains it: a skewed clock being fixed), else that
    estimate (a step away from 0 waits for the next answer), rounded as always."""
    epoch = Epoch()
    skew = SkewEstimate(epoch=epoch)
    measured: float | None = None
    for kind, value in steps:
        truth = ims_minus_base - epoch.value
        if kind == "step":
            epoch.value += value
        elif kind == "observe":
            skew.observe(*_answer(ims_minus_base, epoch.value))
            measured = truth
        else:
            skew.observe(None, *_answer(ims_minus_base, epoch.value)[1:])
        truth = ims_minus_base - epoch.value
        if measured is None:
            expected = 0.0
        elif abs(truth) < abs(measured):
            expected = significant(truth)
        else:
            expected = significant(measured)
        assert skew.offset_s == expected, (kind, value, truth, measured, skew.offset_s)
        assert abs(skew.offset_s) <= max(abs(truth), abs(measured or 0.0)) + 0.05


def test_a_reader_never_pairs_an_estimate_with_the_wrong_epoch() -> None:
    """The exchanger observes while the node's clock jumps between two settings; a scrape
    thread reads meanwhile. Every reading must be one of the two truths, never a mix."""
    epoch = Epoch()
    skew = SkewEstimate(epoch=epoch)
    ims = 50
    skew.observe(*_answer(ims, 0.0))
    truths = {significant(ims - 0.0), significant(ims - 1000.0)}
    seen: set[float] = set()
    stop = threading.Event()

    def scrape() -> None:
        while not stop.is_set():
            seen.add(skew.offset_s)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    reader = threading.Thread(target=scrape, daemon=True)
    try:
        reader.start()
        for i in range(4000):
            epoch.value = 1000.0 if i % 2 else 0.0
            skew.observe(*_answer(ims, epoch.value))
    finally:
        stop.set()
        reader.join(timeout=5)
        sys.setswitchinterval(interval)
    assert not reader.is_alive()
    assert seen <= truths, sorted(seen - truths)[:5]
    assert seen  # the reader did read


def test_a_node_clock_fixed_between_answers_reads_zero_at_once() -> None:
    epoch = Epoch()
    skew = SkewEstimate(epoch=epoch)
    skew.observe(*_answer(600, 0.0))
    assert skew.offset_s == 600.0
    epoch.value = 600.0
    assert skew.offset_s == 0.0
    # A later answer agreeing with the fixed clock keeps it at zero (noise, not a step).
    skew.observe(*_answer(600 + 3600, 3600 + 600.0))
    assert skew.offset_s == 0.0


def test_a_step_between_the_answer_and_its_observation_is_not_lost() -> None:
    """Found by attack: a step landing between the answer and observe() stored the pre-step
    sample with the post-step epoch. The exchange now reads the epoch before sending, and an
    answer that straddles a step is not used."""
    epoch = Epoch()
    skew = SkewEstimate(epoch=epoch)
    skew.observe(*_answer(600, 0.0))  # the node is 600 s behind IMS
    epoch_sent = skew.epoch()  # as ImsClient._request reads it, before sending
    date, sent_at, received_at = _answer(600 + 100, 100.0)  # a later answer, same clock
    epoch.value = 600.0  # ... and right after it arrived, NTP sets the node's clock right
    assert skew.observe(date, sent_at, received_at, epoch_sent) is None
    # The node's clock now is IMS's: the truth is 0 (the sample was taken before the step).
    assert skew.offset_s == 0.0


def test_the_boot_epoch_is_finite_and_stable_under_threads() -> None:
    """The real epoch, read from several threads at once, stays put (no machine clock
    step is made here) and is a finite number."""
    first = boot_epoch()
    readings: list[float] = []

    def read() -> None:
        readings.extend(boot_epoch() for _ in range(2000))

    threads = [threading.Thread(target=read) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert math.isfinite(first)
    assert len(readings) == 6000
    assert max(abs(r - first) for r in readings) < 0.5


@pytest.mark.parametrize("offset", [1.95, 1.99999, -1.999, 2.0, -2.0, 2.04, 604800.0, -1e12])
def test_significant_rounding_at_the_edges(offset: float) -> None:
    value = significant(offset)
    if abs(offset) < RESOLUTION_S:
        assert value == 0.0
    else:
        assert abs(value) >= RESOLUTION_S - 0.05
        assert abs(value - offset) <= 0.05 + 1e-9 * abs(offset)


def test_a_huge_step_of_our_clock_is_not_crashed_on() -> None:
    """A node measured 6 days behind; its clock set 30 days ahead, then right, then back:
    no exception, and only the step that explains the skew is followed."""
    epoch = Epoch()
    skew = SkewEstimate(epoch=epoch)
    skew.observe(*_answer(6 * 86400, 0.0))
    assert skew.offset_s == 6 * 86400.0
    epoch.value = 30 * 86400.0
    assert skew.offset_s == 6 * 86400.0  # -24 days is further from 0: waits for IMS
    epoch.value = 6 * 86400.0
    assert skew.offset_s == 0.0  # the node's clock set right
    epoch.value = 0.0
    assert skew.offset_s == 6 * 86400.0  # set back to where it was measured: as measured


# ---- 3. the image without kubernetes.aio ---------------------------------------------

AIO_BLOCKED = """
import importlib, importlib.abc, json, sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

class NoAio(importlib.abc.MetaPathFinder):
    # As in the image: kubernetes/aio is deleted, so importing it fails.
    def find_spec(self, name, path=None, target=None):
        if name == "kubernetes.aio" or name.startswith("kubernetes.aio."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoAio())
sys.modules["kubernetes_validate"] = None  # a test-only extra, not in the image
modules = sys.argv[3:]
for name in modules:
    importlib.import_module(name)

from refresher.clock import SystemClock
from refresher.sinks.secret import SecretSink, _load_client
from refresher.token import AccessToken

kube = _load_client(False, sys.argv[1], Path(sys.argv[2]))
assert kube.configuration.host == "https://127.0.0.1:1", kube.configuration.host
sink = SecretSink("adobe-ims-token", "team-a", clock=SystemClock(), kubeconfig=sys.argv[2],
                  in_cluster=False, service_account_dir=Path(sys.argv[2]).parent / "none")
now = datetime.now(UTC)
token = AccessToken("probe-" + "x" * 40, now, now + timedelta(hours=24), "oauth", "c", "ims")
sink.publish(token)
held = sink.read_current()
print(json.dumps({
    "aio": sorted(m for m in sys.modules if m.startswith("kubernetes.aio")),
    "held": held is not None and held.value == token.value,
}))
"""

KUBERNETES_MODULES = [
    "kubernetes",
    "kubernetes.client",
    "kubernetes.client.configuration",
    "kubernetes.client.rest",
    "kubernetes.client.exceptions",
    "kubernetes.client.api_client",
    "kubernetes.config",
    "kubernetes.config.config_exception",
    "kubernetes.config.incluster_config",
    "kubernetes.config.kube_config",
    "kubernetes.watch",
    "kubernetes.stream",
    "kubernetes.dynamic",
    "kubernetes.utils",
    "kubernetes.leaderelection",
    "kubernetes.informer",
]


@pytest.fixture
def fake_api() -> Iterator[FakeApiServer]:
    with FakeApiServer(("team-a",)) as server:
        yield server


def test_the_secret_sink_works_without_kubernetes_aio(
    tmp_path: Path, fake_api: FakeApiServer
) -> None:
    unreachable = tmp_path / "unreachable.kubeconfig"
    unreachable.write_text(
        textwrap.dedent(
            """\
            apiVersion: v1
            kind: Config
            clusters: [{name: c, cluster: {server: "https://127.0.0.1:1"}}]
            users: [{name: u, user: {token: not-a-real-token}}]
            contexts: [{name: x, context: {cluster: c, user: u, namespace: team-a}}]
            current-context: x
            """
        ),
        encoding="utf-8",
    )
    reachable = fake_api.write_kubeconfig(tmp_path / "fake.kubeconfig", "team-a")
    result = subprocess.run(
        [sys.executable, "-c", AIO_BLOCKED, str(unreachable), str(reachable), *KUBERNETES_MODULES],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-1500:]
    report = result.stdout.strip().splitlines()[-1]
    assert report == '{"aio": [], "held": true}'
    assert fake_api.requests["PUT"] + fake_api.requests["POST"] >= 1


def test_no_module_outside_kubernetes_aio_names_it() -> None:
    """Statically: no source file of the installed client outside `aio/` imports it (a lazy
    import inside a function would escape the import test above)."""
    spec = importlib.util.find_spec("kubernetes")
    assert spec is not None and spec.submodule_search_locations is not None
    package = Path(next(iter(spec.submodule_search_locations)))
    offenders = []
    scanned = 0
    for source in package.rglob("*.py"):
        if source.relative_to(package).parts[0] == "aio":
            continue
        scanned += 1
        text = source.read_text(encoding="utf-8", errors="replace")
        for line in text.splitlines():
            code = line.split("#", 1)[0]
            if "import" in code and ("kubernetes.aio" in code or "aio" in code.split()):
                offenders.append(f"{source.relative_to(package)}: {line.strip()}")
            if "kubernetes.aio" in code or "kubernetes_asyncio" in code:
                offenders.append(f"{source.relative_to(package)}: {line.strip()}")
    assert scanned > 100
    assert offenders == []
