"""The token directory, published the way kubelet publishes a Secret volume.

    DIR/..2026_11_26_06_30_10.x1y2z3/{access_token,expires_at,token.json}   a snapshot
    DIR/..data -> ..2026_11_26_06_30_10.x1y2z3                               swapped atomically
    DIR/access_token -> ..data/access_token                                  stable names

A reader that opens `DIR/access_token` resolves `..data` once, so it sees the whole
old snapshot or the whole new one, never a mix and never a partial file. Files are
written and fsynced in the snapshot before the swap; the swap is a rename of a
symlink over `..data` (rename(2) is atomic); the directory is fsynced after it.
Only DIR is written: temporary names live inside it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path

from refresher.clock import Clock
from refresher.errors import PublishError
from refresher.token import AccessToken

log = logging.getLogger(__name__)

DATA_LINK = "..data"
_DATA_TMP = "..data_tmp"
_SNAPSHOT_PREFIX = ".."


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, content: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        view = memoryview(content)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fchmod(fd, mode)  # explicit: the umask must not decide what the app can read
        os.fsync(fd)
    finally:
        os.close(fd)


class FileSink:
    name = "file"
    shared = False  # one pod's emptyDir: only we write it

    def __init__(self, directory: Path, *, clock: Clock, file_mode: int = 0o440) -> None:
        self.directory = directory
        self.clock = clock
        self.file_mode = file_mode

    def prepare(self) -> None:
        """Create DIR if needed and remove what an interrupted publish left behind."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PublishError(
                f"cannot create {self.directory}: {exc.strerror}", sink=self.name
            ) from None
        self._remove_stale()

    def read_current(self) -> AccessToken | None:
        try:
            document = json.loads((self.directory / "token.json").read_bytes())
            return AccessToken.from_document(document)
        except (OSError, ValueError):
            return None

    def publish(self, token: AccessToken) -> AccessToken:
        try:
            self._publish(token.published_files())
        except OSError as exc:
            raise PublishError(
                f"cannot publish into {self.directory}: {exc.strerror or exc}", sink=self.name
            ) from None
        return token

    def _publish(self, files: dict[str, bytes]) -> None:
        stamp = self.clock.now().strftime("%Y_%m_%d_%H_%M_%S.")
        snapshot = Path(tempfile.mkdtemp(prefix=_SNAPSHOT_PREFIX + stamp, dir=self.directory))
        try:
            for name, content in files.items():
                _write_file(snapshot / name, content, self.file_mode)
            snapshot.chmod(0o755)  # like kubelet: readers traverse it, the files carry the mode
            _fsync_dir(snapshot)
            tmp_link = self.directory / _DATA_TMP
            with contextlib.suppress(FileNotFoundError):
                tmp_link.unlink()
            tmp_link.symlink_to(snapshot.name)
            tmp_link.replace(self.directory / DATA_LINK)  # the one atomic step
        except BaseException:
            _remove_tree(snapshot)
            raise
        for name in files:
            self._ensure_link(name)
        _fsync_dir(self.directory)
        self._remove_stale()

    def _ensure_link(self, name: str) -> None:
        """`DIR/name -> ..data/name`, created once; replaced atomically if it is anything else."""
        link = self.directory / name
        target = f"{DATA_LINK}/{name}"
        with contextlib.suppress(OSError):
            if os.readlink(link) == target:
                return
        tmp = self.directory / f"..{name}.tmp"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        tmp.symlink_to(target)
        tmp.replace(link)

    def _remove_stale(self) -> None:
        """Old snapshots and temp links: everything `..*` except `..data` and its target."""
        try:
            current = os.readlink(self.directory / DATA_LINK)
        except OSError:
            current = None
        with os.scandir(self.directory) as entries:
            for entry in entries:
                if not entry.name.startswith(_SNAPSHOT_PREFIX) or entry.name in (
                    DATA_LINK,
                    current,
                ):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    _remove_tree(Path(entry.path))
                else:
                    with contextlib.suppress(FileNotFoundError):
                        Path(entry.path).unlink()


def _remove_tree(path: Path) -> None:
    # Snapshots are flat; no shutil.rmtree needed (and nothing outside DIR is touched).
    with contextlib.suppress(FileNotFoundError):
        for child in path.iterdir():
            with contextlib.suppress(FileNotFoundError):
                child.unlink()
        path.rmdir()
