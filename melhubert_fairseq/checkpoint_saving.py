"""Saving checkpoints so that a crash never leaves a truncated one.

fairseq writes ``checkpoint_N_M.pt`` and then copies it onto ``checkpoint_last.pt`` /
``checkpoint_best.pt`` with a plain copy onto the live file, so a kill or a full disk during the copy
leaves a truncated ``checkpoint_last.pt`` that every rerun fails to load. Here every checkpoint file, the
copies included, is written to a temporary file in the same folder, fsynced, and renamed over the old one
(then the folder is fsynced): a crash at any instant leaves the old file or the new one.
:func:`torch_persistent_save` and :class:`AtomicCopyPathManager` are what
:mod:`melhubert_fairseq.fairseq_patches` puts in place of fairseq's own.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any, Callable

import torch
from fairseq.file_io import PathManager

from melhubert_fairseq.atomic_output import atomic_output

logger = logging.getLogger(__name__)


def atomic_torch_save(obj: Any, path: str, overwrite: bool = True) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsynced, then renamed onto it (an existing
    ``path`` is only replaced with ``overwrite``): a crash never leaves a truncated checkpoint."""
    with atomic_output(path, overwrite=overwrite, mode="wb") as handle:
        torch.save(obj, handle)


def atomic_copy(src_path: str, dst_path: str) -> None:
    """Copy ``src_path`` onto ``dst_path`` through a temporary file: ``dst_path`` is never partial."""
    with open(src_path, "rb") as source, atomic_output(dst_path, overwrite=True, mode="wb") as target:
        shutil.copyfileobj(source, target, length=16 << 20)


class AtomicCopyPathManager(PathManager):
    """fairseq's PathManager for its checkpoint module: copies of local files onto checkpoint files are
    :func:`atomic_copy`."""

    @staticmethod
    def copy(src_path: str, dst_path: str, overwrite: bool = False) -> bool:
        """``PathManager.copy``, atomic for local files."""
        if PathManager.path_requires_pathmanager(src_path) or PathManager.path_requires_pathmanager(dst_path):
            return PathManager.copy(src_path, dst_path, overwrite=overwrite)
        if not overwrite and os.path.exists(dst_path):
            return False
        atomic_copy(src_path, dst_path)
        return True


def torch_persistent_save(obj: Any, filename: str, async_write: bool, fairseq_save: Callable[..., None]) -> None:
    """fairseq's ``checkpoint_utils.torch_persistent_save``, atomic and fsynced for local files;
    ``fairseq_save`` (fairseq's own) writes asynchronous and remote saves."""
    if async_write or PathManager.path_requires_pathmanager(filename):
        return fairseq_save(obj, filename, async_write=async_write)
    for attempt in range(3):  # fairseq retries too: network file systems fail transiently
        try:
            atomic_torch_save(obj, filename)
            return None
        except Exception:
            if attempt == 2:
                raise
            logger.warning(f"saving {filename} failed (attempt {attempt + 1} of 3), retrying", exc_info=True)
            time.sleep(2.5)
    return None
