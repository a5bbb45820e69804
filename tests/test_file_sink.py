"""The token directory sink: kubelet's layout, modes, fsync'd atomic swap, cleanup of
leftovers, adoption reads, and failures that keep the previous snapshot."""

from __future__ import annotations

import json
import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from refresher.errors import PublishError
from refresher.sinks.file import FileSink
from refresher.token import AccessToken
from tests.fakes import FakeClock

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
    sink = FileSink(tmp_path, clock=FakeClock(T0))
    token = make_token(5)
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
