"""Reading the mounted files: small regular UTF-8 files, through kubelet's current snapshot,
and the change signature that tells the loop when to read again.

What a writer in the middle of its work can produce is `CredentialsNotReady` (a name we
just listed that vanished, a dangling link, an empty file, UTF-8 cut at the very end);
everything else is a permanent `CredentialsError`.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISDIR, S_ISLNK
from typing import Any, Final

from refresher.atomic_dir import (
    DATA_LINK,
    NotRegularFileError,
    current_snapshot,
    is_writers,
    read_regular,
)
from refresher.errors import CredentialsError, CredentialsNotReady

# Credentials files are a few KiB; anything this large is a wrong path (a log, a
# tarball), and reading it on every attempt would not be cheap.
MAX_FILE_BYTES: Final = 1 << 20


@dataclass(frozen=True)
class Listing:
    """What a credentials directory holds, read through kubelet's snapshot if it has one."""

    path: Path
    base: Path  # the snapshot `..data` resolves to, else `path` itself
    names: frozenset[str]  # the files in `base`
    top: frozenset[str]  # the names in `path` (key links, while `..data` is swapped)

    @property
    def source(self) -> str:
        return str(self.path)

    @property
    def in_snapshot(self) -> bool:
        # kubelet's snapshot holds regular files only: a link there is not followed.
        return self.base != self.path

    def read(self, name: str, source: str, field: str = "") -> str:
        """The listed file `name`, as text."""
        return read_text(
            self.base / name, source, listed=True, field=field, nofollow=self.in_snapshot
        )


def list_directory(path: Path) -> Listing:
    source = str(path)
    try:
        snapshot = current_snapshot(path)
    except OSError:
        raise CredentialsNotReady(
            "..data points to a missing snapshot (the Secret is being swapped)", source=source
        ) from None
    base = path if snapshot is None else snapshot
    names = _list_names(base, source)
    # Top-level links that exist while the snapshot lacks their target mean
    # kubelet is between swapping ..data and relinking the keys.
    top = _list_names(path, source) if base != path else names
    return Listing(path, base, names, top)


def _list_names(directory: Path, source: str) -> frozenset[str]:
    try:
        return frozenset(e.name for e in directory.iterdir() if not is_writers(e.name))
    except FileNotFoundError:
        raise CredentialsNotReady(
            "vanished while being read (the Secret is being swapped)", source=source
        ) from None
    except OSError as exc:
        raise CredentialsError(f"cannot be listed: {exc.strerror}", source=source) from None


def read_text(
    file: Path, source: str, *, listed: bool, field: str = "", nofollow: bool = False
) -> str:
    """Read a small regular UTF-8 file (BOM tolerated). Empty or cut short → not ready."""
    data = _read_bytes(file, source, listed=listed, field=field, nofollow=nofollow)
    if len(data) > MAX_FILE_BYTES:
        raise CredentialsError(
            "is larger than 1 MiB, not a credentials file", source=source, field=field
        )
    text = _decode(data, source, field)
    if not text.strip() and not field:
        raise CredentialsNotReady("is empty (half-written?)", source=source)
    return text


def _read_bytes(file: Path, source: str, *, listed: bool, field: str, nofollow: bool) -> bytes:
    try:
        return read_regular(file, MAX_FILE_BYTES, dir_fd=None, nofollow=nofollow)
    except NotRegularFileError:
        raise CredentialsError(
            "is not a regular file (a FIFO, socket or device?); only regular files are read",
            source=source,
            field=field,
        ) from None
    except FileNotFoundError:
        # A name we just listed, or a symlink whose target is gone: a swap in progress.
        if listed or file.is_symlink():
            raise CredentialsNotReady(
                "vanished or dangles (the Secret is being swapped)", source=source, field=field
            ) from None
        raise CredentialsError("does not exist", source=source, field=field) from None
    except IsADirectoryError:
        raise CredentialsError(
            "is a directory, expected a file", source=source, field=field
        ) from None
    except OSError as exc:
        raise CredentialsError(
            f"cannot be read: {exc.strerror}", source=source, field=field
        ) from None


def _decode(data: bytes, source: str, field: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        if exc.end == len(data) and exc.reason == "unexpected end of data":
            raise CredentialsNotReady(
                "ends inside a UTF-8 character (half-written)", source=source, field=field
            ) from None
        raise CredentialsError(
            f"is not UTF-8 text (invalid byte at offset {exc.start})", source=source, field=field
        ) from None


def change_signature(path: str | os.PathLike[str]) -> tuple[object, ...]:
    """A cheap fingerprint of PATH that differs after any change kubelet or a user makes.

    Only `stat`, `readlink` and `listdir`: no reads, no parsing. Never raises
    for a filesystem state (missing, dangling, unreadable): the state is part of
    the signature, so its appearance or disappearance is itself a change.

    `run` takes one every `--watch-interval` for as long as it lives, so it is plain
    `os` calls on strings (no pathlib objects): an lstat, a stat only when PATH is a
    link, the `..data` readlink, and for a directory one scandir and a stat per key.
    """
    name = _normal(os.fspath(path))
    link = _stat_part(name, follow=False)
    # A stat that follows nothing would return the very same fields.
    target = _stat_part(name) if link[0] == "error" or S_ISLNK(link[0]) else link
    if target[0] != "error" and S_ISDIR(target[0]):
        return _directory_signature(name, link, target)
    # A file inside a Secret volume: its stat already follows ..data, and the
    # link target names the snapshot, which kubelet never reuses.
    return (name, link, target, _readlink_part(_data_link(name, inside=False)))


def _directory_signature(
    name: str, link: tuple[object, ...], target: tuple[object, ...]
) -> tuple[object, ...]:
    parts: list[object] = [name, link, target, _readlink_part(_data_link(name, inside=True))]
    try:
        with os.scandir(name) as entries:
            found = sorted((e.name, e.path) for e in entries if not is_writers(e.name))
    except OSError as exc:
        found = []
        parts.append(("listdir", exc.errno))
    parts.extend((entry, _stat_part(path)) for entry, path in found)
    return tuple(parts)


@functools.lru_cache(maxsize=8)
def _normal(name: str) -> str:
    """NAME as a Path spells it: `creds.json/` would be ENOTDIR to stat, every time."""
    return str(Path(name))


@functools.lru_cache(maxsize=8)
def _data_link(name: str, *, inside: bool) -> str:
    """`..data` in the directory NAME (`inside`), or beside the file NAME."""
    return str((Path(name) if inside else Path(name).parent) / DATA_LINK)


def _stat_part(name: str, *, follow: bool = True) -> tuple[Any, ...]:
    try:
        st = os.stat(name, follow_symlinks=follow)  # noqa: PTH116 (no Path per watch check)
    except OSError as exc:
        return ("error", exc.errno)
    return (st.st_mode, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _readlink_part(link: str) -> tuple[object, ...]:
    try:
        return ("link", os.readlink(link))
    except OSError as exc:
        return ("error", exc.errno)
