"""The token directory, published the way kubelet publishes a Secret volume.

    DIR/..2026_11_26_06_30_10.1a2b3c4d/{access_token,expires_at,token.json}   a snapshot
    DIR/..data -> ..2026_11_26_06_30_10.1a2b3c4d                               swapped atomically
    DIR/access_token -> ..data/access_token                                    stable names

A reader that opens `DIR/access_token` resolves `..data` once, so it sees the whole
old snapshot or the whole new one, never a mix and never a partial file. Files are
written and fsynced in the snapshot before the swap; the swap is a rename of a
symlink over `..data` (rename(2) is atomic); the directory is fsynced after it.
Only DIR is written: temporary names live inside it. The layout itself (the names,
what a snapshot is) is `refresher.atomic_dir`, which the credentials reader shares.

DIR is shared with other containers (an emptyDir), so nothing found in it is trusted.
Every operation inside it is relative to a descriptor of DIR opened without following
a symlink, and never follows one itself: a neighbour that swaps a symlink in where a
snapshot was cannot make us read, write or delete anything outside DIR. Removing
leftovers is best effort (logged once per entry, never fatal), and a token is adopted
only from a complete, consistent, plausible set reached through `..data`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from refresher.atomic_dir import (
    DATA_LINK,
    SNAPSHOT_PREFIX,
    is_snapshot_name,
    key_link,
    read_regular,
    snapshot_in,
)
from refresher.clock import Clock
from refresher.errors import PublishError
from refresher.token import AccessToken, parse_rfc3339

log = logging.getLogger(__name__)

PUBLISHED = ("access_token", "expires_at", "token.json")
"""The names of `AccessToken.published_files()`, each a stable symlink through `..data`."""
_DIR_MODE = 0o755  # DIR and parents we create: readers traverse, only we write
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_MAX_FILE_BYTES = 64 * 1024  # a published file is ~2 KiB; a bigger one is not ours
_REPORTED_CAP = 256  # leftovers remembered as "already logged" (a neighbour may plant many)


@contextlib.contextmanager
def _opened_dir(name: str | Path, dir_fd: int | None = None) -> Iterator[int]:
    """A descriptor of the directory `name`; a symlink there is refused (ELOOP), not followed."""
    fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    try:
        yield fd
    finally:
        os.close(fd)


def _make_dirs(path: Path) -> None:
    """`mkdir -p` with explicit modes: the umask (000 in some images) must not make DIR or
    a parent world-writable. Directories that already exist are left as they are."""
    missing: list[Path] = []
    while not os.path.lexists(path):
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(_DIR_MODE)
        except FileExistsError:
            continue  # created concurrently by someone else: not ours to chmod
        directory.chmod(_DIR_MODE)


def _snapshot_mode(file_mode: int) -> int:
    """The owner keeps rwx (to remove the snapshot later); group and others may traverse
    exactly when --file-mode lets them read the files. Never writable by them."""
    mode = 0o700
    if file_mode & 0o040:
        mode |= 0o050
    if file_mode & 0o004:
        mode |= 0o005
    return mode


def _write_file(dir_fd: int, name: str, content: bytes, mode: int) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(name, flags, 0o600, dir_fd=dir_fd)
    try:
        view = memoryview(content)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fchmod(fd, mode)  # explicit: the umask must not decide what the app can read
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_file(dir_fd: int, name: str) -> bytes:
    """A small regular file; anything else (a symlink, a FIFO, a huge file) is ValueError
    (or OSError). Opening a FIFO planted there does not hang us."""
    data = read_regular(name, _MAX_FILE_BYTES, dir_fd=dir_fd, nofollow=True)
    if len(data) > _MAX_FILE_BYTES:
        raise ValueError(f"{name} is too big")
    return data


def _remove_entry(dir_fd: int, name: str, uid: int) -> str | None:
    """Remove the leftover `name` inside the directory `dir_fd`; the reason if it stays.

    A file or a symlink is unlinked (a symlink is never followed, wherever it points).
    A directory is opened with O_NOFOLLOW, so one swapped for a symlink in between is
    refused rather than followed; it is removed only if we own it and it is flat like
    the snapshots we write (a subdirectory in it is not ours: it stays, and is logged).
    """
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        pass  # a directory: below
    except OSError as exc:
        return exc.strerror or str(exc)
    else:
        return None
    try:
        return _remove_flat_dir(dir_fd, name, uid)
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        return "it holds a directory, unlike a snapshot"
    except OSError as exc:
        return exc.strerror or str(exc)


def _remove_flat_dir(dir_fd: int, name: str, uid: int) -> str | None:
    """Empty and remove the directory `name` if we own it; the reason if it stays."""
    with _opened_dir(name, dir_fd) as fd:
        owner = os.fstat(fd).st_uid
        if owner != uid:
            return f"a directory owned by uid {owner}, not by us"
        for child in os.listdir(fd):  # noqa: PTH208 - by descriptor; pathlib has none
            with contextlib.suppress(FileNotFoundError):
                os.unlink(child, dir_fd=fd)
    os.rmdir(name, dir_fd=dir_fd)
    return None


class FileSink:
    name = "file"
    shared = False  # one pod's emptyDir: only we write it

    def __init__(self, directory: Path, *, clock: Clock, file_mode: int = 0o440) -> None:
        self.directory = directory
        self.clock = clock
        self.file_mode = file_mode
        # A symlink the operator configured (e.g. --token-dir /run/t -> /shared/t) is
        # resolved once, here; a symlink swapped in later is refused, not followed.
        self._path = Path(os.path.realpath(directory))
        self._uid = os.geteuid()
        self._reported: set[str] = set()  # leftovers already logged as not removable

    def prepare(self) -> None:
        """Create DIR if needed and remove what an interrupted publish left behind."""
        try:
            _make_dirs(self._path)
            with _opened_dir(self._path) as dir_fd:
                self._remove_stale(dir_fd)
        except OSError as exc:
            raise PublishError(
                f"cannot create {self.directory}: {self._why(exc)}", sink=self.name
            ) from None

    def read_current(self) -> AccessToken | None:
        """The token of the complete set `..data` names, if it is consistent and plausible."""
        try:
            with _opened_dir(self._path) as dir_fd:
                token = self._read_set(dir_fd)
        except (OSError, ValueError):  # missing, garbled, foreign: there is no token
            return None
        return token if token.is_plausible(self.clock.now()) else None

    def publish(self, token: AccessToken) -> AccessToken:
        try:
            with _opened_dir(self._path) as dir_fd:
                self._publish(dir_fd, token.published_files())
                self._remove_stale(dir_fd)
        except OSError as exc:
            raise PublishError(
                f"cannot publish into {self.directory}: {self._why(exc)}", sink=self.name
            ) from None
        return token

    def _why(self, exc: OSError) -> str:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR) and self._path.is_symlink():
            return "it is now a symlink (not followed: DIR is shared)"
        return exc.strerror or str(exc)

    # ---- reading ------------------------------------------------------------------------

    def _read_set(self, dir_fd: int) -> AccessToken:
        """Raises ValueError (or OSError) unless DIR holds one whole set written by us."""
        target = snapshot_in(dir_fd)
        for name in PUBLISHED:
            if os.readlink(name, dir_fd=dir_fd) != key_link(name):
                raise ValueError(f"{name} does not go through ..data")
        with _opened_dir(target, dir_fd) as snapshot_fd:
            if os.fstat(snapshot_fd).st_uid != self._uid:
                raise ValueError("the snapshot is not ours")
            files = {name: _read_file(snapshot_fd, name) for name in PUBLISHED}
        token = AccessToken.from_document(json.loads(files["token.json"]))
        if files["access_token"].decode("ascii") != token.value:
            raise ValueError("access_token and token.json disagree")
        if parse_rfc3339(files["expires_at"].decode("ascii")) != token.expires_at:
            raise ValueError("expires_at and token.json disagree")
        return token

    # ---- writing ------------------------------------------------------------------------

    def _publish(self, dir_fd: int, files: dict[str, bytes]) -> None:
        snapshot = self._new_snapshot(dir_fd)
        try:
            with _opened_dir(snapshot, dir_fd) as snapshot_fd:
                for name, content in files.items():
                    _write_file(snapshot_fd, name, content, self.file_mode)
                os.fchmod(snapshot_fd, _snapshot_mode(self.file_mode))
                os.fsync(snapshot_fd)
            # The stable names first (they dangle only before the very first swap), so
            # the swap below is the one step from the old complete set to the new one.
            for name in files:
                self._ensure_link(dir_fd, name, key_link(name))
            self._ensure_link(dir_fd, DATA_LINK, snapshot, always=True)
        except BaseException:
            _remove_entry(dir_fd, snapshot, self._uid)
            raise
        os.fsync(dir_fd)

    def _new_snapshot(self, dir_fd: int) -> str:
        stamp = self.clock.now().strftime("%Y_%m_%d_%H_%M_%S")
        while True:
            name = f"{SNAPSHOT_PREFIX}{stamp}.{secrets.token_hex(4)}"
            try:
                os.mkdir(name, 0o700, dir_fd=dir_fd)  # private until its files are complete
            except FileExistsError:
                continue  # 2^32 names a second: a collision is a neighbour's doing; next
            return name

    def _ensure_link(self, dir_fd: int, name: str, target: str, *, always: bool = False) -> None:
        """`DIR/name -> target`, swapped in with one rename if it is anything else.

        The temporary link gets a fresh random name, so nothing planted can be in its way.
        """
        if not always:
            with contextlib.suppress(OSError):
                if os.readlink(name, dir_fd=dir_fd) == target:
                    return
        tmp = f"{SNAPSHOT_PREFIX}{name.lstrip('.')}.{secrets.token_hex(4)}.tmp"
        os.symlink(target, tmp, dir_fd=dir_fd)
        try:
            try:
                os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            except IsADirectoryError:
                # A directory planted as `..data` would block every publish; `..*` names
                # are ours, so it goes like any leftover (if it can), then the swap again.
                # A directory at a stable name is someone else's: that publish fails.
                if not name.startswith(SNAPSHOT_PREFIX):
                    raise
                reason = _remove_entry(dir_fd, name, self._uid)
                if reason is not None:
                    self._report(name, reason)
                os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise

    # ---- cleaning -----------------------------------------------------------------------

    def _remove_stale(self, dir_fd: int) -> None:
        """Old snapshots and temp links: every `..*` but `..data` and its target. Best
        effort: what cannot go is logged once and left; publishing never fails for it."""
        try:
            current: str | None = os.readlink(DATA_LINK, dir_fd=dir_fd)
        except OSError:
            current = None
        try:
            names = os.listdir(dir_fd)
        except OSError as exc:
            self._report(".", exc.strerror or str(exc))
            return
        for name in names:
            if not is_snapshot_name(name) or name == current:
                continue
            reason = _remove_entry(dir_fd, name, self._uid)
            if reason is None:
                self._reported.discard(name)
            else:
                self._report(name, reason)

    def _report(self, name: str, reason: str) -> None:
        if name in self._reported:
            return
        if len(self._reported) >= _REPORTED_CAP:
            self._reported.clear()
        self._reported.add(name)
        # %r: the name is a neighbour's choice and may hold newlines or escape codes.
        log.warning(
            "cannot remove the leftover %r in %s: %s; left in place",
            name,
            self.directory,
            reason,
            extra={"sink": self.name},
        )
