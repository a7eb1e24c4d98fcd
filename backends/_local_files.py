"""Durable, atomic file writes on a POSIX filesystem (for the local and fsspec backends).

Every write goes to a temp file in the target's directory, is fsync'd, and
then appears under its final name in one step: ``os.link`` for a create
(fails with ``EEXIST`` atomically, so of many creators exactly one wins and
the winner's file appears whole), ``os.replace`` for an overwrite. The
directory is fsync'd afterwards so the new entry survives a crash.

Temp files are named ``.<name>.tmp-<32 hex>``; :func:`is_temp_name` tells
them apart so listings can skip them.

Example:
    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> import os
    >>> makedirs_durable(f"{tmp.name}/c/log")
    >>> create_file(f"{tmp.name}/c/log/00000001.json", b"{}")
    >>> create_file(f"{tmp.name}/c/log/00000001.json", b"[]")  # exactly one creator wins
    Traceback (most recent call last):
    FileExistsError: [Errno 17] File exists: ...
    >>> os.listdir(f"{tmp.name}/c/log")  # no temp file is left behind
    ['00000001.json']
    >>> tmp.cleanup()
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import uuid
from collections.abc import Callable, Iterator

__all__ = [
    "create_file",
    "dir_lock",
    "fsync_dir",
    "is_temp_name",
    "makedirs_durable",
    "replace_file",
]

_TEMP_RE = re.compile(r"^\..*\.tmp-[0-9a-f]{32}$", re.DOTALL)


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is one of the in-flight temp files written here.

    Example:
        >>> is_temp_name(".x.json.tmp-" + "0" * 32)
        True
    """
    return bool(_TEMP_RE.match(name))


def _temp_path(final_path: str) -> str:
    directory, name = os.path.split(final_path)
    # Keep the name short enough for NAME_MAX even for long keys.
    return os.path.join(directory, f".{name[:40]}.tmp-{uuid.uuid4().hex}")


@contextlib.contextmanager
def dir_lock(directory: str) -> Iterator[None]:
    """Exclusive ``flock`` on ``directory``; per open file description, so threads conflict too.

    Example:
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> with dir_lock(tmp.name):
        ...     pass  # no other holder of this directory's lock runs here
        >>> tmp.cleanup()
    """
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def fsync_dir(directory: str) -> None:
    """fsync ``directory`` so the entries just added to or removed from it survive a crash.

    Example:
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> fsync_dir(tmp.name)
        >>> tmp.cleanup()
    """
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    with open(fd, "wb", buffering=0, closefd=True) as handle:
        view = memoryview(data)
        while view:
            view = view[handle.write(view) :]
        os.fsync(fd)


def makedirs_durable(directory: str) -> None:
    """``os.makedirs`` that also fsyncs each new directory's parent, so the entries survive.

    Raises ``NotADirectoryError`` when a file is in the way.

    Example:
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> import os
        >>> makedirs_durable(f"{tmp.name}/c/log")
        >>> os.path.isdir(f"{tmp.name}/c/log")
        True
        >>> tmp.cleanup()
    """
    missing: list[str] = []
    path = directory
    while not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    for path in reversed(missing):
        try:
            os.mkdir(path)
        except FileExistsError:
            if not os.path.isdir(path):
                raise NotADirectoryError(errno.ENOTDIR, "a file is in the way", path) from None
        fsync_dir(os.path.dirname(path))


def create_file(path: str, data: bytes) -> None:
    """Create ``path`` holding ``data`` only if absent, atomically and durably.

    Temp file in the same directory, fsync, ``os.link`` (fails with
    ``EEXIST`` atomically, and the file appears whole), unlink the temp,
    fsync the directory. The directory must exist.

    Raises:
      FileExistsError: ``path`` exists (another creator won).

    Example:
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> create_file(f"{tmp.name}/00000001.json", b"{}")
        >>> open(f"{tmp.name}/00000001.json", "rb").read()
        b'{}'
        >>> tmp.cleanup()
    """
    temp = _temp_path(path)
    _write_file(temp, data)
    try:
        os.link(temp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
    fsync_dir(os.path.dirname(path))


def replace_file(
    path: str,
    data: bytes,
    *,
    lock: contextlib.AbstractContextManager[None] | None = None,
    check: Callable[[], None] | None = None,
) -> None:
    """Atomically and durably replace ``path`` with ``data`` (temp, fsync, ``os.replace``).

    The slow part (writing and syncing the temp file) happens outside
    ``lock``; only ``check`` (which may raise to abandon the write) and the
    replace run inside it. The directory must exist.

    Example:
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> replace_file(f"{tmp.name}/partialstore.json", b"{}")
        >>> replace_file(f"{tmp.name}/partialstore.json", b"[]")
        >>> open(f"{tmp.name}/partialstore.json", "rb").read()
        b'[]'
        >>> tmp.cleanup()
    """
    temp = _temp_path(path)
    try:
        _write_file(temp, data)
        with lock or contextlib.nullcontext():
            if check is not None:
                check()
            os.replace(temp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
    fsync_dir(os.path.dirname(path))
