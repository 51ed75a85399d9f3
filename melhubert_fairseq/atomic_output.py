"""Write one file so that readers see either its old content or the complete new one.

:func:`atomic_output` writes to a temporary file next to the output, fsyncs it and renames it into place
on success; a crash, a Ctrl-C or a SIGKILL never leaves a half-written file under the final name, and the
next write of the same file removes what a killed writer left (:func:`remove_stale_temp_files`). This
module owns the temporary files' names (:func:`temp_file_prefix`, :func:`temp_file_target`). The other
jobs of writing outputs live beside it: sets of outputs in
:mod:`~melhubert_fairseq.staged_outputs`, full disks in :mod:`~melhubert_fairseq.disk_full`, lock files in
:mod:`~melhubert_fairseq.file_locks`, and the checks on output paths (no silent overwrite, no output that
is an input) in :mod:`~melhubert_fairseq.output_guards`.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from typing import IO, Iterator, List, Optional, Sequence

import numpy as np

# Module, not function, import: tests replace disk_full.open_for_writing to fill the disk at any byte.
from melhubert_fairseq import disk_full
from melhubert_fairseq.disk_full import WriteWatch, disk_full_error
from melhubert_fairseq.file_locks import try_lock
from melhubert_fairseq.output_guards import check_writable


def fsync_directory(directory: str) -> None:
    """Make a rename inside ``directory`` durable (a crash after it cannot bring the old name back)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems (and all of Windows) cannot fsync a directory
        pass
    finally:
        os.close(fd)


def make_folders(directory: str) -> List[str]:
    """``os.makedirs(directory, exist_ok=True)``; return the folders it created, outermost first."""
    missing = []
    current = os.path.abspath(directory)
    while not os.path.isdir(current):
        missing.append(current)
        current = os.path.dirname(current)
    os.makedirs(directory, exist_ok=True)
    return missing[::-1]


def remove_empty_folders(created: Sequence[str]) -> None:
    """Remove the folders :func:`make_folders` created if they are still empty (a failed run leaves none)."""
    for folder in reversed(created):
        with contextlib.suppress(OSError):
            os.rmdir(folder)


def note(message: str) -> None:
    """One ``note: ...`` line on stderr (recoveries a user should know about)."""
    print(f"note: {message}", file=sys.stderr)


#: What :func:`atomic_output`'s temporary files are called: ``.{output name}.{random characters}.tmp``
#: (``tempfile.mkstemp`` with :func:`temp_file_prefix` and :data:`TEMP_SUFFIX`; the random part has no dot).
TEMP_FILE_NAME = re.compile(r"^\.(?P<target>.+)\.[^.]+\.tmp$")
TEMP_SUFFIX = ".tmp"


def temp_file_prefix(path: str) -> str:
    """The start of the name of a temporary file written for ``path`` (hidden, then the output's name)."""
    return f".{os.path.basename(path)}."


def temp_file_target(name: str) -> Optional[str]:
    """The output name a temporary file called ``name`` was written for, or None if it is not one."""
    match = TEMP_FILE_NAME.match(name)
    return match.group("target") if match else None


def remove_stale_temp_files(path: str) -> List[str]:
    """Delete the temporary files of killed :func:`atomic_output` writes of ``path``; return them.

    A live writer holds an flock on its temporary file, so only files of dead
    processes are removed, even with other writers running.
    """
    directory = os.path.dirname(os.path.abspath(path))
    target = os.path.basename(path)
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(directory):
            if temp_file_target(name) != target:
                continue
            candidate = os.path.join(directory, name)
            try:
                fd = os.open(candidate, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                if try_lock(fd) is True:  # only a file no live writer holds (unknown: keep it)
                    os.unlink(candidate)
                    removed.append(candidate)
            finally:
                os.close(fd)
    return removed


@contextlib.contextmanager
def atomic_output(path: str, overwrite: bool = False, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file next to ``path``; rename it onto ``path`` only on success.

    A full disk (or quota) at any point, however the writer reports it, is one
    :class:`DiskFullError` naming ``path``, and ``path`` keeps what it held.
    """
    check_writable(path, overwrite)
    directory = os.path.dirname(os.path.abspath(path))
    created: List[str] = []
    tmp_path = None
    lock_fd = None
    watch = None
    try:
        created = make_folders(directory)
        stale = remove_stale_temp_files(path)
        if stale:
            note(f"removed {len(stale)} temporary file(s) of an interrupted write of {path}")
        fd, tmp_path = tempfile.mkstemp(prefix=temp_file_prefix(path), suffix=TEMP_SUFFIX, dir=directory)
        # The lock marks the temporary file as live until it is renamed (or removed);
        # a duplicate descriptor keeps it held after the handle below is closed.
        lock_fd = os.dup(fd)
        try_lock(lock_fd)
        # mkstemp creates 0600 files; give the output the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        with contextlib.suppress(OSError):  # a file system that refuses chmod keeps mkstemp's mode
            os.chmod(tmp_path, 0o666 & ~umask)
        with disk_full.open_for_writing(fd, mode) as handle:
            watch = WriteWatch(handle)
            yield watch
            handle.flush()
            os.fsync(handle.fileno())
        # Re-check: another process may have created the file meanwhile.
        check_writable(path, overwrite)
        os.replace(tmp_path, path)
        fsync_directory(directory)
    except BaseException as err:
        if tmp_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_path)
        remove_empty_folders(created)
        full = disk_full_error(path, err, watch)
        if full is None or full is err:
            raise
        raise full from err
    finally:
        if lock_fd is not None:
            os.close(lock_fd)


def atomic_save_npy(path: str, array: np.ndarray, overwrite: bool = False) -> None:
    """Save ``array`` as ``.npy`` at ``path`` atomically."""
    with atomic_output(path, overwrite=overwrite, mode="wb") as handle:
        np.save(handle, array, allow_pickle=False)

