"""The one atomic file writer: write beside the target under a temporary name, fsync, rename.

Readers never see half a file, and a crash leaves the old version in place. Temporary files are
named ``.<target name>.tmp-<pid>-<random>`` (hidden, and never ending in ``.parquet``, so no
reader of a folder picks one up). A handled error removes its temporary file; one left by a
process killed with -9 is removed by ``clean_stale_temps`` once that process is gone.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

_TEMP = re.compile(r"^\..+\.tmp-(?P<pid>\d+)-[0-9a-f]{8}$")
# Written by versions before this module (no writer pid): removed once older than an hour.
_LEGACY_TEMP = re.compile(r"^\.tmp-[0-9a-f]{32}\.(parquet|json)$")
_LEGACY_AGE_S = 3600.0


def temp_path(path: str | os.PathLike) -> Path:
    """A fresh temporary name beside ``path`` (same folder, so the rename cannot cross devices)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on any exception it goes.

    The parent folder is created. A ``path`` that is an existing folder is refused before anything
    is written (IsADirectoryError), so no temporary file is left beside it.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a folder, not a file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def clean_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove temporary files of dead writers in ``folder`` (not recursive); returns what went.

    A writer is dead when its pid no longer runs on this host. Temporary files of live writers
    (another process writing the same folder now) are left alone.
    """
    folder = Path(folder)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:  # missing or unreadable folder: nothing to clean
        return removed
    for entry in entries:
        match = _TEMP.match(entry.name)
        try:
            if match:
                stale = not _pid_alive(int(match["pid"]))
            elif _LEGACY_TEMP.match(entry.name):
                stale = time.time() - entry.stat().st_mtime > _LEGACY_AGE_S
            else:
                continue
            if stale and entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:  # raced with its writer or another cleaner: not ours to worry about
            continue
    return removed


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (best effort: not every platform can open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
