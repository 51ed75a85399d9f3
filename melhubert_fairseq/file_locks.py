"""Exclusive, non-blocking flock lock files that die with their holder (no stale lock after a kill)."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from typing import Optional


def try_lock(fd: int) -> Optional[bool]:
    """Take an exclusive flock on ``fd`` without waiting; False if another process holds it,
    None if the file system cannot lock (e.g. Lustre mounted without flock, some FUSE/SMB mounts).

    flock locks die with their process, so a lock that can be taken marks a
    file left behind by a killed run.
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        return None
    return True


def acquire_lock_file(path: str) -> Optional[int]:
    """flock ``path`` (created if missing) exclusively, without waiting: the open descriptor that holds the
    lock, or None if another live process holds it. The kernel releases the lock when its holder dies, so
    a lock file left by a killed run never blocks. On a file system that cannot lock the descriptor is
    returned unlocked (a concurrent run then goes undetected).

    Retries when the file it opened was unlinked meanwhile (a finishing holder removes it, see
    :func:`release_lock_file`), so that two runs never both hold "the" lock on different files.
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        if try_lock(fd) is False:
            os.close(fd)
            return None
        try:
            same_file = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same_file = False
        if same_file:
            return fd
        os.close(fd)


def release_lock_file(path: str, fd: int) -> None:
    """Remove the lock file ``path`` and release the lock ``fd`` (from :func:`acquire_lock_file`) held on it."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    os.close(fd)

