"""Full disks and exhausted quotas, reported as one :class:`DiskFullError` naming the output.

``torch.save`` and numpy hide the errno of a write that found no room; :func:`writing` and
:func:`~melhubert_fairseq.atomic_output.atomic_output` hand writers a watched handle that keeps it, so a
full disk is always ``<path>: no space left on device (...)``. :func:`open_for_writing` is the one place
output files are opened (tests replace it to fill the disk at any byte).
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
from typing import IO, Any, Iterator, Optional, Union

import numpy as np

#: errno values of a write that found no room: the file system is full, or the user's quota is used up.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(OSError):
    """A write ran out of space; the message is ``<path>: no space left on device (...)`` (a user error:
    the tools print it as one ``error:`` line, exit 2, with what was there before left in place)."""


class WriteWatch:
    """A file handle passed through as it is, remembering the first full-disk error its writes raised.

    ``torch.save`` turns that error into its own ``RuntimeError: [enforce fail ...]`` and numpy's
    ``tofile`` into ``OSError: N requested and M written``, both without the errno; the watch keeps it.
    """

    def __init__(self, handle: IO) -> None:
        self._handle = handle
        self.disk_full: Optional[OSError] = None

    def _watch(self, call, *args):
        try:
            return call(*args)
        except OSError as err:
            if err.errno in DISK_FULL_ERRNOS and self.disk_full is None:
                self.disk_full = err
            raise

    def write(self, data):
        """The handle's ``write``, watched."""
        return self._watch(self._handle.write, data)

    def writelines(self, lines):
        """The handle's ``writelines``, watched."""
        return self._watch(self._handle.writelines, lines)

    def flush(self):
        """The handle's ``flush``, watched."""
        return self._watch(self._handle.flush)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)


def _full_disk_cause(err: BaseException, watch: Optional[WriteWatch]) -> Optional[OSError]:
    """The full-disk OSError behind ``err``: seen by ``watch``, or in ``err``'s chain of causes."""
    if watch is not None and watch.disk_full is not None:
        return watch.disk_full
    seen = set()
    current: Optional[BaseException] = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in DISK_FULL_ERRNOS:
            return current
        current = current.__cause__ or current.__context__
    return None


def _free_space(directory: str) -> str:
    """``'12.3 MB free there'``: the free space of the folder a write failed in (empty if unknown)."""
    with contextlib.suppress(OSError):
        free = shutil.disk_usage(directory).free
        for unit in ("B", "kB", "MB", "GB", "TB"):
            if free < 1000 or unit == "TB":
                return f"{free:.0f} {unit} free there" if unit == "B" else f"{free:.1f} {unit} free there"
            free /= 1000
    return ""


def open_for_writing(file: Union[str, int], mode: str = "wb") -> IO:
    """``open(file, mode)`` (a path or a descriptor) for an output: the one place where the files of
    :func:`~melhubert_fairseq.atomic_output.atomic_output` and :func:`writing` are opened (tests replace it
    to fill the disk at any byte)."""
    return open(file, mode) if "b" in mode else open(file, mode, encoding="utf-8")


def disk_full_error(path: str, err: BaseException, watch: Optional[WriteWatch] = None) -> Optional[DiskFullError]:
    """The :class:`DiskFullError` naming ``path`` when ``err`` (raised while writing it) comes from a full disk
    or quota, else None; ``watch`` is the handle the writer wrote to, if any."""
    if isinstance(err, DiskFullError):
        return err
    cause = _full_disk_cause(err, watch)
    if cause is None:
        return None
    details = ", ".join(
        part for part in (
            errno.errorcode.get(cause.errno, str(cause.errno)),
            "disk quota exceeded" if cause.errno == errno.EDQUOT else "",
            _free_space(os.path.dirname(os.path.abspath(path))),
        ) if part
    )
    return DiskFullError(
        f"{path}: no space left on device ({details}); nothing was replaced: free some space and run again"
    )


@contextlib.contextmanager
def writing(path: str, mode: str = "wb") -> Iterator[IO]:
    """Open ``path`` for writing (parent folders created), as a handle whose full-disk errors, however the
    writer reports them, become one :class:`DiskFullError` naming ``path``. Not atomic: for files in a
    private staging folder (:class:`~melhubert_fairseq.staged_outputs.StagedOutputs`);
    :func:`~melhubert_fairseq.atomic_output.atomic_output` for files under their final name."""
    watch = None
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open_for_writing(path, mode) as raw:
            watch = WriteWatch(raw)
            yield watch
    except BaseException as err:
        if watch is not None:  # no partial file is left behind
            with contextlib.suppress(OSError):
                os.unlink(path)
        full = disk_full_error(path, err, watch)
        if full is None or full is err:
            raise
        raise full from err


def save_npy(path: str, array: np.ndarray) -> None:
    """``np.save`` to ``path`` (parent folders created; not atomic: for staged files), a full disk reported
    as a :class:`DiskFullError` naming ``path``."""
    with writing(path) as handle:
        np.save(handle, array, allow_pickle=False)

