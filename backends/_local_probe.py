"""What a local filesystem supports: ``renameat2(RENAME_NOREPLACE)`` and directory ``flock``.

Plain ``os.rename`` silently replaces an empty target directory, so the local
backend renames through libc's ``renameat2`` with ``RENAME_NOREPLACE``. Not
every platform has it and not every filesystem honours it (some answer
``EINVAL``), and NFS's ``flock`` emulation refuses the read-only descriptors a
directory lock needs. :func:`probe` tries both in a scratch directory, once
per device, and the backend promises only what worked.

The examples assume Linux and a local filesystem such as ext4 or tmpfs.

Example:
    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> cache = {}
    >>> probe(f"{tmp.name}/ckpts", find_renameat2(), cache)  # (atomic_rename, dir_flock)
    (True, True)
    >>> len(cache)  # answers are kept per device
    1
    >>> tmp.cleanup()
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable

from ._local_files import dir_lock

__all__ = ["ProbeCache", "RenameAt2", "find_renameat2", "probe", "rename_noreplace"]

#: libc's ``renameat2(olddirfd, oldpath, newdirfd, newpath, flags)``.
RenameAt2 = Callable[..., int]
#: Probe answers ``(atomic_rename, dir_flock)`` by device number.
ProbeCache = dict[int, tuple[bool, bool]]

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}
# One probe at a time, so concurrent constructors fill each device's entry once.
_probe_lock = threading.Lock()


def find_renameat2() -> RenameAt2 | None:
    """libc's ``renameat2``, or ``None`` off Linux or when libc lacks it.

    Example:
        >>> find_renameat2() is not None
        True
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    function.restype = ctypes.c_int
    return function


def rename_noreplace(renameat2: RenameAt2, src: str, dst: str) -> None:
    """``renameat2(src, dst, RENAME_NOREPLACE)``; raises ``OSError`` with the errno.

    Example:
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> import os
        >>> os.mkdir(f"{tmp.name}/a"); os.mkdir(f"{tmp.name}/b")
        >>> rename_noreplace(find_renameat2(), f"{tmp.name}/a", f"{tmp.name}/b")
        Traceback (most recent call last):
        FileExistsError: [Errno 17] File exists: ...
        >>> tmp.cleanup()
    """
    if renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE):
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), src, None, dst)


def _nearest_existing_dir(path: str) -> str:
    while not os.path.isdir(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def probe(root: str, renameat2: RenameAt2 | None, cache: ProbeCache) -> tuple[bool, bool]:
    """``(atomic_rename, dir_flock)`` for the filesystem that holds (or will hold) ``root``.

    Probed in a scratch directory inside the root's nearest existing
    ancestor, once per device (answers are kept in ``cache``): whether
    ``renameat2(RENAME_NOREPLACE)`` works (some filesystems answer
    ``EINVAL``) and whether an exclusive ``flock`` on a directory works
    (NFS's emulation refuses read-only fds). An answer that could not be
    found promises nothing and is not cached.

    See the module docstring for an example.
    """
    anchor = _nearest_existing_dir(root)
    try:
        device = os.stat(anchor).st_dev
    except OSError:
        return False, False
    with _probe_lock:
        if device in cache:
            return cache[device]
        try:
            scratch = tempfile.mkdtemp(prefix=".partialstore-probe-", dir=anchor)
        except OSError:
            return False, False  # not writable: nothing to promise, do not cache
        try:
            answer = _probe_in(scratch, renameat2)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        if answer is None:
            return False, False  # inconclusive (the scratch dir was disturbed): promise nothing
        cache[device] = answer
        return answer


def _probe_in(scratch: str, renameat2: RenameAt2 | None) -> tuple[bool, bool] | None:
    """Probe inside ``scratch``; ``None`` when an unrelated error makes the answer unknown."""
    try:
        rename_ok = _probe_rename(scratch, renameat2)
        flock_ok = None if rename_ok is None else _probe_flock(scratch)
    except OSError:
        return None
    if rename_ok is None or flock_ok is None:
        return None
    return rename_ok, flock_ok


def _probe_rename(scratch: str, renameat2: RenameAt2 | None) -> bool | None:
    """Whether ``RENAME_NOREPLACE`` is honoured; ``None`` on an unrelated error."""
    if renameat2 is None:
        return False
    os.mkdir(os.path.join(scratch, "a"))
    os.mkdir(os.path.join(scratch, "b"))
    try:
        rename_noreplace(renameat2, os.path.join(scratch, "a"), os.path.join(scratch, "b"))
    except OSError as exc:
        # EEXIST is the right answer: the flag is honoured.
        if exc.errno not in _UNSUPPORTED | {errno.EEXIST}:
            return None
        return exc.errno == errno.EEXIST
    return False  # it replaced the empty target: the flag was ignored


def _probe_flock(scratch: str) -> bool | None:
    """Whether an exclusive ``flock`` on a directory works; ``None`` on an unrelated error."""
    try:
        with dir_lock(scratch):
            return True
    except OSError as exc:
        if exc.errno not in _UNSUPPORTED | {errno.EBADF, errno.ENOLCK}:
            return None
        return False
