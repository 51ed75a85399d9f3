"""A run's set of outputs (features, their mean/std and, last, the manifest), staged then published by renames."""
from __future__ import annotations

import json
import os
import shutil
from typing import Dict, List, Optional, Sequence

from melhubert_fairseq.atomic_output import atomic_output, make_folders, note, remove_empty_folders
from melhubert_fairseq.disk_full import DiskFullError, disk_full_error
from melhubert_fairseq.errors import InputError
from melhubert_fairseq.file_locks import acquire_lock_file, release_lock_file
from melhubert_fairseq.output_guards import check_writable


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
