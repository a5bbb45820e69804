"""The token directory sink: kubelet's layout, modes, fsync'd atomic swap, cleanup of
leftovers, adoption reads, and failures that keep the previous snapshot. DIR is shared
with other containers, so the tests also plant what a neighbour could: symlinks where
snapshots were, undeletable leftovers, forged sets, FIFOs. (Racing attacks live in
tests/reliability/test_neighbour_attacks.py.)"""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from refresher.credentials.volume import list_directory
from refresher.errors import PublishError
from refresher.sinks.file import PUBLISHED, FileSink
from refresher.token import AccessToken
from tests.support.fakes import FakeClock

T0 = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def make_token(n: int) -> AccessToken:
    return AccessToken(
        value=f"token-value-{n:04d}",
        issued_at=T0 + timedelta(hours=n),
        expires_at=T0 + timedelta(hours=n + 24),
        flow="jwt",
        client_id="client-1",
        ims_endpoint="https://ims-na1.adobelogin.com",
    )


def test_layout_matches_kubelet(tmp_path: Path) -> None:
    """Names are symlinks through ..data, which points at one hidden snapshot directory."""
    sink = FileSink(tmp_path / "t", clock=FakeClock(T0))
    sink.prepare()
    sink.publish(make_token(1))
    d = tmp_path / "t"
    assert os.readlink(d / "access_token") == "..data/access_token"
    assert os.readlink(d / "expires_at") == "..data/expires_at"
    assert os.readlink(d / "token.json") == "..data/token.json"
    snapshot = os.readlink(d / "..data")
    assert snapshot.startswith("..2026_11_26_12_00_00.")
    assert sorted(p.name for p in d.iterdir()) == sorted(
        ["..data", snapshot, "access_token", "expires_at", "token.json"]
    )


def test_the_credentials_reader_sees_the_set_the_sink_wrote(tmp_path: Path) -> None:
    """One layout on both sides: the credentials reader resolves the sink's ..data to the
    snapshot it just wrote and lists exactly the published names."""
    sink = FileSink(tmp_path, clock=FakeClock(T0))
    sink.publish(make_token(1))
    first = list_directory(tmp_path)
    assert first.base == tmp_path / os.readlink(tmp_path / "..data")
    assert first.names == first.top == frozenset(PUBLISHED)
    sink.publish(make_token(2))
    assert list_directory(tmp_path).base != first.base  # a new snapshot, never reused


def test_contents_and_mode(tmp_path: Path) -> None:
    """access_token has no newline, expires_at is RFC 3339, token.json has the SPEC's keys,
    and each file has --file-mode regardless of the umask."""
    sink = FileSink(tmp_path, clock=FakeClock(T0), file_mode=0o440)
    sink.publish(make_token(1))
    assert (tmp_path / "access_token").read_bytes() == b"token-value-0001"
    assert (tmp_path / "expires_at").read_text() == "2026-11-27T13:00:00Z"
    document = json.loads((tmp_path / "token.json").read_text())
    assert set(document) == {
        "access_token",
        "token_type",
        "expires_at",
        "issued_at",
        "expires_in",
        "flow",
        "client_id",
        "ims_endpoint",
    }
    assert document["expires_in"] == 86400
    for name in ("access_token", "expires_at", "token.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o440


def test_old_snapshots_are_removed(tmp_path: Path) -> None:
    """After three publishes only the current snapshot remains."""
    clock = FakeClock(T0)
    sink = FileSink(tmp_path, clock=clock)
    for n in range(3):
        clock.advance(1)
        sink.publish(make_token(n))
    snapshots = [p for p in tmp_path.iterdir() if p.name.startswith("..20")]
    assert len(snapshots) == 1
    assert (tmp_path / "access_token").read_text() == "token-value-0002"


def test_prepare_cleans_an_interrupted_publish(tmp_path: Path) -> None:
    """Leftovers of a crash (a half-written snapshot, a temp link) go; the current stays."""
    sink = FileSink(tmp_path, clock=FakeClock(T0))
    sink.publish(make_token(1))
    (tmp_path / "..2026_11_26_12_00_09.crashed").mkdir()
    (tmp_path / "..2026_11_26_12_00_09.crashed" / "access_token").write_text("half")
    (tmp_path / "..data_tmp").symlink_to("..2026_11_26_12_00_09.crashed")
    FileSink(tmp_path, clock=FakeClock(T0)).prepare()
    assert not (tmp_path / "..2026_11_26_12_00_09.crashed").exists()
    assert not (tmp_path / "..data_tmp").is_symlink()
    assert (tmp_path / "access_token").read_text() == "token-value-0001"


def test_read_current_round_trips_for_adoption(tmp_path: Path) -> None:
    """The published token reads back with the same value and instants."""
    token = make_token(5)
    sink = FileSink(tmp_path, clock=FakeClock(token.issued_at + timedelta(minutes=1)))
    sink.publish(token)
    again = sink.read_current()
    assert again is not None
    assert (again.value, again.issued_at, again.expires_at) == (
        token.value,
        token.issued_at,
        token.expires_at,
    )


def test_read_current_of_garbage_is_none(tmp_path: Path) -> None:
    """A missing or garbled token.json is no token, not an exception."""
    sink = FileSink(tmp_path, clock=FakeClock(T0))
    assert sink.read_current() is None
    (tmp_path / "token.json").write_text("{not json")
    assert sink.read_current() is None


def test_regular_file_in_the_way_is_replaced_by_a_link(tmp_path: Path) -> None:
    """A stray regular `access_token` file (an older tool) becomes the ..data symlink."""
    (tmp_path / "access_token").write_text("stale")
    sink = FileSink(tmp_path, clock=FakeClock(T0))
    sink.publish(make_token(1))
    assert (tmp_path / "access_token").is_symlink()
    assert (tmp_path / "access_token").read_text() == "token-value-0001"


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_directory_keeps_the_previous_snapshot(tmp_path: Path) -> None:
    """A publish into a read-only directory raises PublishError and leaves the old token."""
    sink = FileSink(tmp_path, clock=FakeClock(T0))
    sink.publish(make_token(1))
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(PublishError, match="cannot publish"):
            sink.publish(make_token(2))
    finally:
        tmp_path.chmod(0o755)
    assert (tmp_path / "access_token").read_text() == "token-value-0001"


def test_failure_mid_publish_keeps_the_previous_snapshot(tmp_path: Path) -> None:
    """If writing the new snapshot fails (here: a file name that is a directory), the swap
    never happens and the old token stays readable."""
    sink = FileSink(tmp_path, clock=FakeClock(T0))
    sink.publish(make_token(1))
    bad = make_token(2)
    original = bad.published_files

    def broken_files() -> dict[str, bytes]:
        files = original()
        files["sub/dir"] = b"x"  # cannot be created inside the snapshot
        return files

    object.__setattr__(bad, "published_files", broken_files)
    with pytest.raises(PublishError):
        sink.publish(bad)
    assert (tmp_path / "access_token").read_text() == "token-value-0001"
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("..20")]) == 1


# ---------------------------------------------------------------- a neighbour's leftovers


def _victim(root: Path, count: int = 20) -> Path:
    victim = root / "victim"
    victim.mkdir()
    for n in range(count):
        (victim / f"file-{n}").write_text("precious")
    return victim


def test_a_symlink_where_a_snapshot_was_is_unlinked_not_followed(tmp_path: Path) -> None:
    """`..2020_...x -> /elsewhere` (absolute or relative) is removed as a link; nothing
    it points at is touched."""
    victim = _victim(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "..2020_01_01_00_00_00.x").symlink_to(victim)
    (out / "..2020_01_01_00_00_00.y").symlink_to("../victim")
    sink = FileSink(out, clock=FakeClock(T0))
    sink.prepare()
    sink.publish(make_token(0))
    assert not os.path.lexists(out / "..2020_01_01_00_00_00.x")
    assert not os.path.lexists(out / "..2020_01_01_00_00_00.y")
    assert len(list(victim.iterdir())) == 20


def test_leftover_with_a_subdirectory_is_logged_once_and_never_fatal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A `..*` directory holding a directory (not a snapshot of ours) stays, is logged once
    over several publishes, and prepare and publish still succeed."""
    leftover = tmp_path / "..2020_01_01_00_00_00.x"
    (leftover / "sub").mkdir(parents=True)
    (leftover / "sub" / "keep").write_text("theirs")
    sink = FileSink(tmp_path, clock=FakeClock(T0))
    with caplog.at_level(logging.WARNING, logger="refresher"):
        sink.prepare()
        for n in range(3):
            sink.publish(make_token(n))
    warnings = [r for r in caplog.records if "cannot remove the leftover" in r.getMessage()]
    assert len(warnings) == 1
    assert "..2020_01_01_00_00_00.x" in warnings[0].getMessage()
    assert (leftover / "sub" / "keep").read_text() == "theirs"
    assert (tmp_path / "access_token").read_text() == "token-value-0002"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to plant another user's directory")
def test_a_directory_owned_by_someone_else_is_not_emptied(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A `..*` directory another uid owns (moved in by a neighbour) keeps its files: a root
    refresher deletes only what it could have written."""
    leftover = tmp_path / "..2020_01_01_00_00_00.x"
    leftover.mkdir()
    (leftover / "theirs").write_text("theirs")
    os.chown(leftover, 12345, 12345)
    sink = FileSink(tmp_path, clock=FakeClock(T0))
    with caplog.at_level(logging.WARNING, logger="refresher"):
        sink.prepare()
        sink.publish(make_token(1))
    assert (leftover / "theirs").read_text() == "theirs"
    assert any("owned by uid 12345" in r.getMessage() for r in caplog.records)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_leftover_is_logged_and_never_fatal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A leftover snapshot made read-only (0500) cannot be emptied: logged, publish goes on."""
    leftover = tmp_path / "..2020_01_01_00_00_00.x"
    leftover.mkdir()
    (leftover / "access_token").write_text("old")
    leftover.chmod(0o500)
    try:
        sink = FileSink(tmp_path, clock=FakeClock(T0))
        with caplog.at_level(logging.WARNING, logger="refresher"):
            sink.prepare()
            sink.publish(make_token(1))
    finally:
        leftover.chmod(0o700)
    assert (tmp_path / "access_token").read_text() == "token-value-0001"
    assert any("cannot remove the leftover" in r.getMessage() for r in caplog.records)


def _chattr(flag: str, path: Path) -> bool:
    try:
        done = subprocess.run(["chattr", flag, str(path)], capture_output=True, check=False)
    except OSError:
        return False
    return done.returncode == 0


def test_an_immutable_leftover_is_logged_and_never_fatal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A leftover holding an immutable file (`chattr +i`: not even root may delete it)
    stays, is logged once, and prepare and publish succeed."""
    leftover = tmp_path / "..2020_01_01_00_00_00.x"
    leftover.mkdir()
    stuck = leftover / "access_token"
    stuck.write_text("old")
    if not _chattr("+i", stuck):
        pytest.skip("chattr +i needs root and a filesystem that supports it")
    try:
        sink = FileSink(tmp_path, clock=FakeClock(T0))
        with caplog.at_level(logging.WARNING, logger="refresher"):
            sink.prepare()
            sink.publish(make_token(1))
            sink.publish(make_token(2))
    finally:
        _chattr("-i", stuck)
    assert (tmp_path / "access_token").read_text() == "token-value-0002"
    warnings = [r for r in caplog.records if "cannot remove the leftover" in r.getMessage()]
    assert len(warnings) == 1
    assert "Operation not permitted" in warnings[0].getMessage()


def test_cleanup_failure_does_not_fail_a_publish(tmp_path: Path) -> None:
    """The publish itself succeeded: a leftover that stays is no PublishError."""
    (tmp_path / "..2020_01_01_00_00_00.x" / "sub").mkdir(parents=True)
    sink = FileSink(tmp_path, clock=FakeClock(T0))
    assert sink.publish(make_token(1)).value == "token-value-0001"


def test_umask_000_creates_nothing_world_writable(tmp_path: Path) -> None:
    """Under umask 000, DIR and the parents we create are 0755, snapshots follow
    --file-mode (0750 for 0440, 0755 for 0444), and files carry --file-mode exactly."""
    previous = os.umask(0)
    try:
        for file_mode, snapshot_mode in ((0o440, 0o750), (0o444, 0o755)):
            top = tmp_path / f"mode-{file_mode:o}"
            out = top / "a" / "b"
            sink = FileSink(out, clock=FakeClock(T0), file_mode=file_mode)
            sink.prepare()
            sink.publish(make_token(1))
            for directory in (top, top / "a", out):
                assert stat.S_IMODE(directory.stat().st_mode) == 0o755, directory
            snapshot = out / os.readlink(out / "..data")
            assert stat.S_IMODE(snapshot.stat().st_mode) == snapshot_mode
            for name in PUBLISHED:
                assert stat.S_IMODE((out / name).stat().st_mode) == file_mode
    finally:
        os.umask(previous)


def test_an_existing_directory_keeps_its_mode(tmp_path: Path) -> None:
    """DIR that already exists (kubelet makes an emptyDir 0777) is not chmodded by us."""
    tmp_path.chmod(0o777)
    FileSink(tmp_path, clock=FakeClock(T0)).prepare()
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o777


def test_published_names_are_the_tokens_files() -> None:
    """The names adoption reads are exactly the files a token publishes."""
    assert sorted(PUBLISHED) == sorted(make_token(0).published_files())


# ---------------------------------------------------------------- adoption trusts nothing


def _sink_at(path: Path, token: AccessToken) -> FileSink:
    """A sink whose clock reads a minute after `token` was issued."""
    return FileSink(path, clock=FakeClock(token.issued_at + timedelta(minutes=1)))


def _publish_into(path: Path, token: AccessToken) -> None:
    sink = FileSink(path, clock=FakeClock(T0))
    sink.prepare()
    sink.publish(token)


def _forged_document(**changes: object) -> dict[str, object]:
    document = make_token(0).to_document()
    document.update(changes)
    return document


def test_a_token_json_alone_is_not_adopted(tmp_path: Path) -> None:
    """A regular token.json with a year-9999 expiry and no ..data is no published token."""
    forged = _forged_document(expires_at="9999-12-31T23:59:59Z")
    (tmp_path / "token.json").write_text(json.dumps(forged))
    (tmp_path / "access_token").write_text(str(forged["access_token"]))
    assert _sink_at(tmp_path, make_token(0)).read_current() is None


@pytest.mark.parametrize("absolute", [True, False])
def test_data_pointing_outside_dir_is_not_adopted(tmp_path: Path, absolute: bool) -> None:
    """`..data` naming a complete, valid set outside DIR (absolute, or `../x`) is refused."""
    token = make_token(0)
    elsewhere = tmp_path / "elsewhere"
    _publish_into(elsewhere, token)
    out = tmp_path / "out"
    out.mkdir()
    snapshot = elsewhere / os.readlink(elsewhere / "..data")
    target = str(snapshot) if absolute else f"../elsewhere/{snapshot.name}"
    (out / "..data").symlink_to(target)
    for name in PUBLISHED:
        (out / name).symlink_to(f"..data/{name}")
    assert (out / "access_token").read_text() == token.value  # a reader would follow it
    assert _sink_at(out, token).read_current() is None


@pytest.mark.parametrize(
    ("issued", "expires"),
    [
        (T0, T0 + timedelta(days=365 * 7000)),  # year 9999
        (T0, T0 + timedelta(hours=49)),  # longer than MAX_LIFETIME
        (T0 + timedelta(hours=1), T0 + timedelta(hours=25)),  # issued in the future
    ],
    ids=["year-9999", "49-hours", "issued-in-the-future"],
)
def test_an_implausible_complete_set_is_not_adopted(
    tmp_path: Path, issued: datetime, expires: datetime
) -> None:
    """A whole set through ..data with an impossible lifetime is not adopted."""
    forged = AccessToken("forged-token-value", issued, expires, "jwt", "client-1", "https://x")
    FileSink(tmp_path, clock=FakeClock(T0)).publish(forged)
    assert FileSink(tmp_path, clock=FakeClock(T0)).read_current() is None


@pytest.mark.parametrize("name", ["access_token", "expires_at"])
def test_files_that_disagree_with_token_json_are_not_adopted(tmp_path: Path, name: str) -> None:
    """access_token or expires_at differing from token.json (a tampered set) is no token."""
    token = make_token(0)
    sink = _sink_at(tmp_path, token)
    sink.publish(token)
    snapshot = tmp_path / os.readlink(tmp_path / "..data")
    path = snapshot / name
    path.chmod(0o600)
    path.write_text("other-value" if name == "access_token" else "2026-11-27T00:00:01Z")
    assert sink.read_current() is None


def test_a_stable_name_not_through_data_is_not_adopted(tmp_path: Path) -> None:
    """`access_token` replaced by a regular file: readers see something else; mint afresh."""
    token = make_token(0)
    sink = _sink_at(tmp_path, token)
    sink.publish(token)
    (tmp_path / "access_token").unlink()
    (tmp_path / "access_token").write_text(token.value)
    assert sink.read_current() is None


def test_a_fifo_in_the_snapshot_does_not_hang_adoption(tmp_path: Path) -> None:
    """token.json swapped for a FIFO with no writer reads as no token, at once."""
    token = make_token(0)
    sink = _sink_at(tmp_path, token)
    sink.publish(token)
    snapshot = tmp_path / os.readlink(tmp_path / "..data")
    (snapshot / "token.json").unlink()
    os.mkfifo(snapshot / "token.json")
    result: list[object] = []
    reader = threading.Thread(target=lambda: result.append(sink.read_current()), daemon=True)
    reader.start()
    reader.join(5)
    assert result == [None]


def test_a_snapshot_that_is_a_symlink_is_not_adopted(tmp_path: Path) -> None:
    """`..data -> ..x` where `..x` is a symlink to a set elsewhere is not followed."""
    token = make_token(0)
    elsewhere = tmp_path / "elsewhere"
    _publish_into(elsewhere, token)
    out = tmp_path / "out"
    _sink_at(out, token).prepare()
    (out / "..2026_01_01_00_00_00.x").symlink_to(elsewhere / os.readlink(elsewhere / "..data"))
    (out / "..data").symlink_to("..2026_01_01_00_00_00.x")
    for name in PUBLISHED:
        (out / name).symlink_to(f"..data/{name}")
    assert _sink_at(out, token).read_current() is None


def test_a_directory_planted_as_data_does_not_block_publishing(tmp_path: Path) -> None:
    """`..data` made a directory by a neighbour is removed like a leftover, and the swap
    goes through (it used to fail every publish with "Is a directory")."""
    (tmp_path / "..data").mkdir()
    (tmp_path / "..data" / "access_token").write_text("planted")
    sink = FileSink(tmp_path, clock=FakeClock(T0))
    sink.prepare()
    sink.publish(make_token(1))
    assert (tmp_path / "..data").is_symlink()
    assert (tmp_path / "access_token").read_text() == "token-value-0001"


def test_dir_swapped_for_a_symlink_after_start_is_refused(tmp_path: Path) -> None:
    """DIR renamed away and replaced by a symlink to another directory (its parent is
    shared): the publish fails and nothing is written or removed there."""
    out = tmp_path / "out"
    sink = FileSink(out, clock=FakeClock(T0))
    sink.prepare()
    sink.publish(make_token(1))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "..2020_01_01_00_00_00.x").mkdir()
    out.rename(tmp_path / "moved")
    out.symlink_to(elsewhere)
    with pytest.raises(PublishError, match="now a symlink"):
        sink.publish(make_token(2))
    assert sorted(os.listdir(elsewhere)) == ["..2020_01_01_00_00_00.x"]


def test_a_configured_symlink_dir_is_resolved_once_and_works(tmp_path: Path) -> None:
    """--token-dir given as a symlink (the operator's choice) is followed at start."""
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    token = make_token(0)
    sink = _sink_at(tmp_path / "link", token)
    sink.prepare()
    sink.publish(token)
    assert (tmp_path / "real" / "access_token").read_text() == token.value
    assert sink.read_current() == token
