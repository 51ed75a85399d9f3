"""Write files so that readers see either the old state or the complete new file.

Every tool in this project writes through :func:`atomic_output`: a crash, a
Ctrl-C or a bad utterance half-way through a corpus never leaves a
half-written manifest, label file or feature behind, and an existing output is
only replaced when the caller explicitly asks for it.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import IO, Iterator

import numpy as np


def check_writable(path: str, overwrite: bool) -> None:
    """Raise FileExistsError if ``path`` exists and ``overwrite`` is False."""
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(
            f"{path} already exists; refusing to overwrite it (pass --overwrite to replace it)"
        )


def fsync_directory(directory: str) -> None:
    """Make a rename inside ``directory`` durable (a crash after it cannot bring the old name back)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems (and all of Windows) cannot fsync a directory
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(path: str, overwrite: bool = False, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file next to ``path``; rename it onto ``path`` only on success."""
    check_writable(path, overwrite)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(
        prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory
    )
    # mkstemp creates 0600 files; give the output the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        # Re-check: another process may have created the file meanwhile.
        check_writable(path, overwrite)
        os.replace(tmp_path, path)
        fsync_directory(directory)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_path)
        raise


def atomic_save_npy(path: str, array: np.ndarray, overwrite: bool = False) -> None:
    """Save ``array`` as ``.npy`` at ``path`` atomically."""
    with atomic_output(path, overwrite=overwrite, mode="wb") as handle:
        np.save(handle, array, allow_pickle=False)
