"""Write outputs so that readers see either the old state or the complete new one.

Every tool in this project writes through this module. :func:`atomic_output`
writes one file: a temporary file next to it, renamed into place on success.
:class:`StagedOutputs` writes a set of outputs (a folder of features, their
mean/std and, last, the manifest): everything is built in a hidden staging
folder and then published by renames. A crash, a Ctrl-C, a SIGKILL or a bad
utterance half-way through a corpus never leaves a half-written file under a
final name, an existing output is only replaced when the caller asks for it,
and whatever a killed run left behind is cleaned up (or rolled back) by the
next run writing the same outputs. A full disk is one :class:`DiskFullError`
(``<path>: no space left on device (...)``) with the old outputs intact, and
:func:`refuse_replacing_inputs` is the one check that no output is an input.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import stat
import sys
import tempfile
from typing import IO, Any, Dict, Iterable, Iterator, List, Optional, Sequence, Union

import numpy as np

from melhubert_fairseq.errors import InputError


def check_writable(path: str, overwrite: bool) -> None:
    """Raise FileExistsError if ``path`` exists and ``overwrite`` is False."""
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(
            f"{path} already exists; refusing to overwrite it (pass --overwrite to replace it)"
        )


def refuse_replacing_inputs(outputs: Iterable[Optional[str]], inputs: Iterable[Optional[str]]) -> None:
    """Refuse, also with ``--overwrite``, an output that is, or would replace, one of the ``inputs`` files.

    The one rule every tool applies before any work: an output never replaces
    an input (a manifest, a feature or audio file, a checkpoint, a k-means
    model). Files are compared by device and inode, so every spelling of a
    path, a symlink to it and a hard link count as the same file; an output
    folder (replaced as a whole) must not hold an input. Only outputs that
    exist can replace anything, so ``inputs`` (which may be a generator over a
    whole corpus) are only read when one does. None entries are skipped.
    """
    files: Dict[tuple, str] = {}
    folders: List[tuple] = []
    for output in outputs:
        if output is None:
            continue
        try:
            info = os.stat(output)
        except OSError:  # missing (or unreachable): it replaces nothing
            continue
        if stat.S_ISDIR(info.st_mode):
            folders.append((os.path.join(os.path.realpath(output), ""), output))
        else:
            files.setdefault((info.st_dev, info.st_ino), output)
    if not files and not folders:
        return
    for path in inputs:
        if path is None:
            continue
        try:
            info = os.stat(path)
        except OSError:
            continue
        output = files.get((info.st_dev, info.st_ino))
        if output is not None:
            same = "" if os.path.abspath(output) == os.path.abspath(path) else f" ({path})"
            raise InputError(
                f"{output}: this output is an input of the run{same}; refusing to replace it, also with "
                "--overwrite: choose another output path"
            )
        real = os.path.realpath(path)
        for prefix, folder in folders:
            if real.startswith(prefix):
                raise InputError(
                    f"{folder}: this output folder, replaced as a whole, holds the input {path}; refusing to "
                    "replace it, also with --overwrite: choose another output folder"
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


#: errno values of a write that found no room: the file system is full, or the user's quota is used up.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(OSError):
    """A write ran out of space; the message is ``<path>: no space left on device (...)`` (a user error:
    the tools print it as one ``error:`` line, exit 2, with what was there before left in place)."""


class _WriteWatch:
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


def _full_disk_cause(err: BaseException, watch: Optional[_WriteWatch]) -> Optional[OSError]:
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
    :func:`atomic_output` and :func:`writing` are opened (tests replace it to fill the disk at any byte)."""
    return open(file, mode) if "b" in mode else open(file, mode, encoding="utf-8")


def disk_full_error(path: str, err: BaseException, watch: Optional[_WriteWatch] = None) -> Optional[DiskFullError]:
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
    private staging folder (:class:`StagedOutputs`); :func:`atomic_output` for files under their final name."""
    watch = None
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open_for_writing(path, mode) as raw:
            watch = _WriteWatch(raw)
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


def _try_lock(fd: int) -> Optional[bool]:
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
        if _try_lock(fd) is False:
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


def remove_stale_temp_files(path: str) -> List[str]:
    """Delete the temporary files of killed :func:`atomic_output` writes of ``path``; return them.

    A live writer holds an flock on its temporary file, so only files of dead
    processes are removed, even with other writers running.
    """
    directory = os.path.dirname(os.path.abspath(path))
    pattern = re.compile(rf"^\.{re.escape(os.path.basename(path))}\.[a-z0-9_]{{8}}\.tmp$")
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(directory):
            if not pattern.match(name):
                continue
            candidate = os.path.join(directory, name)
            try:
                fd = os.open(candidate, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                if _try_lock(fd) is True:  # only a file no live writer holds (unknown: keep it)
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
        fd, tmp_path = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
        # The lock marks the temporary file as live until it is renamed (or removed);
        # a duplicate descriptor keeps it held after the handle below is closed.
        lock_fd = os.dup(fd)
        _try_lock(lock_fd)
        # mkstemp creates 0600 files; give the output the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        with contextlib.suppress(OSError):  # a file system that refuses chmod keeps mkstemp's mode
            os.chmod(tmp_path, 0o666 & ~umask)
        with open_for_writing(fd, mode) as handle:
            watch = _WriteWatch(handle)
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


def safe_relative_path(rel_path: str, where: str) -> str:
    """``rel_path`` normalised, refusing absolute paths and paths that leave their folder (``..``).

    Output paths are built from input rows (``out_dir/<row path>``): an absolute
    row or one with ``..`` would write outside the output folder, possibly onto
    the input itself.
    """
    normalised = os.path.normpath(rel_path) if rel_path else ""
    if (
        not normalised
        or normalised == "."
        or os.path.isabs(rel_path)
        or normalised.split(os.sep)[0] == ".."
    ):
        raise InputError(f"{where}: path {rel_path!r} must stay below its root folder (relative, without '..')")
    return normalised


def _remove(path: str) -> None:
    """Remove a file, a symlink or a whole folder."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


class StagedOutputs:
    """Stage a run's outputs in hidden folders, then publish them by renames, the commit file last.

    ``roots`` are the folders the outputs live under (the first one holds the
    lock and the publish journal); each gets one staging folder
    ``{root}/.{name}.staging`` on its own file system, so publishing is a
    rename. Usage::

        with StagedOutputs("train.wav_to_fbank", [out_dir], overwrite) as staged:
            save_npy(staged.path(final_feature_path), feats)   # write into staging
            ...
            staged.publish([feature paths..., mean_std_path, manifest_path])

    :meth:`publish` first writes a journal of what it will do, then moves the
    existing outputs it replaces aside (the last, i.e. the manifest, first), then
    renames the staged outputs into place in the given order. So at any instant
    the final names hold the old outputs, the new ones, or (while publishing) no
    manifest at all: never an old manifest over new data. The next run with the
    same ``name`` finds what a killed run left: a staging folder (removed), or a
    journal of an unfinished publish (rolled back: new outputs removed, old ones
    restored); a run killed after its last rename is simply cleaned up.
    A second live run writing the same outputs is refused (flock).

    A full disk while staging or publishing leaves the old outputs in place and
    is one :class:`DiskFullError` (write staged files with :func:`save_npy` or
    :func:`writing`, which see the errno numpy and torch hide).

    This protects against killed processes (pre-emption, Ctrl-C, OOM kills),
    whose written pages survive them. Staged files are not fsynced one by one
    (that would cost more than computing a corpus of small features); single
    files written with :func:`atomic_output` (manifests, labels, the journal) are.
    """

    def __init__(self, name: str, roots: Sequence[str], overwrite: bool) -> None:
        self.name = name
        self.roots = [os.path.abspath(root) for root in roots]
        self.overwrite = overwrite
        self.areas = [os.path.join(root, f".{name}.staging") for root in self.roots]
        self.lock_path = os.path.join(self.roots[0], f".{name}.lock")
        self.journal_path = os.path.join(self.areas[0], "publish.json")
        self._lock_fd: Optional[int] = None
        self._created_roots: List[str] = []
        self._published = False

    # ----------------------------------------------------------------- lifecycle
    def __enter__(self) -> "StagedOutputs":
        for root in self.roots:
            self._created_roots += make_folders(root)
        self._acquire_lock()
        try:
            self.recover()
            for area in self.areas:
                os.makedirs(area)
        except BaseException:
            self._release_lock()
            raise
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        try:
            # A publish that failed half-way (full disk, Ctrl-C) is rolled back now.
            self.recover(on_exit=True)
        finally:
            self._release_lock()
            if not self._published:  # a run that wrote nothing leaves no empty output folder
                remove_empty_folders(self._created_roots)
        full = disk_full_error(self.roots[0], exc) if exc is not None else None
        if full is not None:
            # Name the output being written, not its hidden staging copy (a folder that could not be
            # made is named by the outputs' folder).
            message = str(full)
            for root, area in zip(self.roots, self.areas):
                staged_prefix = os.path.join(area, "new", "")
                if message.startswith(staged_prefix):
                    message = os.path.join(root, message[len(staged_prefix):])
            if full is not exc or message != str(full):
                raise DiskFullError(message) from exc

    def _acquire_lock(self) -> None:
        """flock ``.{name}.lock``; a second live run writing the same outputs is refused."""
        self._lock_fd = acquire_lock_file(self.lock_path)
        if self._lock_fd is None:
            raise InputError(
                f"{self.lock_path}: another run is writing these outputs right now; "
                "wait for it to finish (or stop it) and run again"
            )

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            release_lock_file(self.lock_path, self._lock_fd)
            self._lock_fd = None

    # ----------------------------------------------------------------- recovery
    def recover(self, on_exit: bool = False) -> None:
        """Clean up after a killed run of the same outputs (on entry, under the lock), or after
        this run (on exit): roll back an unfinished publish, remove the staging folders."""
        who = "this run" if on_exit else f"an earlier run of {self.name}"
        if os.path.isfile(self.journal_path):
            try:
                with open(self.journal_path, "r", encoding="utf-8") as handle:
                    entries = json.load(handle)["entries"]
            except (OSError, ValueError, KeyError) as err:
                raise InputError(
                    f"{self.journal_path}: unreadable publish journal of an interrupted run ({err}); "
                    "check the outputs by hand and remove it"
                ) from None
            final, staged, _ = entries[-1]
            if not os.path.lexists(staged) and os.path.lexists(final):
                if not on_exit:
                    note(f"{who} was stopped after publishing all its outputs; cleaned up")
            else:
                self._roll_back(entries)
                note(f"{who} was stopped while publishing its outputs: rolled back to the outputs from before it")
        elif not on_exit and any(os.path.isdir(area) for area in self.areas):
            note(f"removed the staging folder of {who}, which was interrupted")
        for area in self.areas:
            shutil.rmtree(area, ignore_errors=True)

    @staticmethod
    def _roll_back(entries: List[List[str]]) -> None:
        """Undo an unfinished publish: remove what it renamed into place, rename back what it moved aside."""
        for final, staged, _ in reversed(entries):
            if not os.path.lexists(staged) and os.path.lexists(final):
                _remove(final)
        for final, _, retired in entries:
            if os.path.lexists(retired):
                os.makedirs(os.path.dirname(final), exist_ok=True)
                os.rename(retired, final)

    # ----------------------------------------------------------------- staging
    def _area_of(self, final: str) -> Dict[str, str]:
        final = os.path.abspath(final)
        for root, area in zip(self.roots, self.areas):
            if os.path.commonpath([root, final]) == root and final != root:
                rel = os.path.relpath(final, root)
                return {
                    "final": final,
                    "staged": os.path.join(area, "new", rel),
                    "retired": os.path.join(area, "old", rel),
                }
        raise ValueError(f"{final} is not below any of the output folders {self.roots}")

    def mirror(self, root: str) -> str:
        """The staging folder that mirrors ``root``: ``mirror(root)/rel`` is published as ``root/rel``."""
        return os.path.join(self.areas[self.roots.index(os.path.abspath(root))], "new")

    def path(self, final: str) -> str:
        """Where to write the output that will be published as ``final`` (parent folders created)."""
        staged = self._area_of(final)["staged"]
        os.makedirs(os.path.dirname(staged), exist_ok=True)
        return staged

    def publish(self, finals: Sequence[str]) -> None:
        """Rename every staged output onto its final path, in order; the last one commits the run."""
        if not finals:
            raise ValueError("nothing to publish")
        plan = [self._area_of(final) for final in finals]
        for item in plan:
            if not os.path.lexists(item["staged"]):
                raise FileNotFoundError(f"{item['final']} was never staged")
            check_writable(item["final"], self.overwrite)
        entries = [[item["final"], item["staged"], item["retired"]] for item in plan]
        with atomic_output(self.journal_path, overwrite=True) as handle:
            json.dump({"entries": entries}, handle)
        for item in reversed(plan):  # the commit file (manifest) is retired first
            if os.path.lexists(item["final"]):
                os.makedirs(os.path.dirname(item["retired"]), exist_ok=True)
                os.rename(item["final"], item["retired"])
        for item in plan:
            os.makedirs(os.path.dirname(item["final"]), exist_ok=True)
            os.rename(item["staged"], item["final"])
        os.unlink(self.journal_path)
        self._published = True
