"""The checks every tool makes on its output paths before writing anything.

An existing output is only replaced when the caller asks for it (:func:`check_writable`), no output is
or replaces an input, also with ``--overwrite`` (:func:`refuse_replacing_inputs`), and an output path built
from an input row stays below its folder (:func:`safe_relative_path`).
"""
from __future__ import annotations

import os
import stat
from typing import Dict, Iterable, List, Optional

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
