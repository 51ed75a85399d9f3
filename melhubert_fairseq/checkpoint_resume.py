"""Resuming training without manual repair, and one training run per ``checkpoint.save_dir``.

Before fairseq resumes from ``checkpoint_last.pt``, temporary files of a crashed save are removed; if
``checkpoint_last.pt`` cannot be loaded (written by an older fairseq, or damaged), training resumes from
the newest checkpoint in the folder that loads, and says so. A relaunch resumes from
``checkpoint_last.pt`` even when the first launch started from ``checkpoint.restore_file``. A run that
already reached ``max_update`` or ``max_epoch`` says it is finished (:func:`training_finished`) and ends
without training or writing. A training run locks its ``save_dir`` (:func:`lock_save_dir`); a second run
into it is refused naming the holder, and a killed run's lock dies with it.
:mod:`melhubert_fairseq.fairseq_patches` puts these in fairseq's checkpoint module.
"""
from __future__ import annotations

import atexit
import copy
import logging
import os
import re
import socket
import time
from typing import Callable, List, Optional, Sequence, Tuple

from omegaconf import open_dict

from melhubert_fairseq.atomic_output import temp_file_target
from melhubert_fairseq.checkpoint_loading import checkpoint_load_problem, checkpoint_num_updates
from melhubert_fairseq.errors import InputError
from melhubert_fairseq.file_locks import acquire_lock_file, release_lock_file

logger = logging.getLogger(__name__)

#: fairseq's own temporary file of a save (``checkpoint_last.pt.tmp``); ours are
#: :func:`~melhubert_fairseq.atomic_output.atomic_output`'s (``.checkpoint_last.pt.<random>.tmp``).
FAIRSEQ_TEMP_FILE = re.compile(r"^.+\.pt\.tmp$")

#: Checkpoint file names fairseq writes in a save dir (epoch, epoch+update, best, last, keep-best).
CHECKPOINT_FILE = re.compile(r"^checkpoint.*\.pt$")


class UnreadableCheckpointError(InputError):
    """``checkpoint_last.pt`` cannot be loaded and no other checkpoint in its folder can."""


def is_interrupted_save(name: str) -> bool:
    """Whether ``name`` is a temporary file a crashed save of a ``.pt`` file can leave (ours or fairseq's)."""
    target = temp_file_target(name)
    return (target is not None and target.endswith(".pt")) or bool(FAIRSEQ_TEMP_FILE.match(name))


def newest_loadable_checkpoint(save_dir: str, exclude: Sequence[str] = (), suffix: str = "") -> Optional[Tuple[str, int]]:
    """(path, num_updates) of the checkpoint in ``save_dir`` saved at the most updates that loads, or None."""
    excluded = {os.path.abspath(p) for p in exclude}
    found: List[Tuple[int, float, str]] = []
    for name in os.listdir(save_dir):
        path = os.path.join(save_dir, name)
        if not CHECKPOINT_FILE.match(name) or not name.endswith(f"{suffix}.pt") or os.path.abspath(path) in excluded:
            continue
        if not os.path.isfile(path) or checkpoint_load_problem(path) is not None:
            continue
        found.append((checkpoint_num_updates(path), os.path.getmtime(path), path))
    if not found:
        return None
    num_updates, _mtime, path = max(found)
    return path, num_updates


def remove_interrupted_saves(save_dir: str) -> List[str]:
    """Delete temporary files that a killed save left in ``save_dir``; return their names."""
    removed = []
    if not os.path.isdir(save_dir):
        return removed
    for name in os.listdir(save_dir):
        path = os.path.join(save_dir, name)
        if is_interrupted_save(name) and os.path.isfile(path):
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue
            removed.append(name)
    return removed


# --- resuming -------------------------------------------------------------------------------------


def resume_from_checkpoint(cfg, trainer, fairseq_load_checkpoint: Callable, **passthrough_args):
    """fairseq's ``checkpoint_utils.load_checkpoint`` (resume), made to survive crashes and reruns.

    A relaunch resumes from ``{save_dir}/checkpoint_last.pt`` even when the first launch
    started from ``checkpoint.restore_file`` (which, like ``finetune_from_model``, is then
    for the first launch only). Temporary files of a killed save are removed; an
    unreadable ``checkpoint_last.pt`` falls back to the newest loadable checkpoint; a run
    that already reached ``max_update`` / ``max_epoch`` trains nothing and writes nothing
    (:func:`training_finished`). ``fairseq_load_checkpoint`` (fairseq's own) then loads it.
    """
    last = os.path.join(cfg.save_dir, f"checkpoint_last{trainer.checkpoint_suffix}.pt")
    if cfg.restore_file != "checkpoint_last.pt" and os.path.exists(last):
        logger.warning(
            f"checkpoint.restore_file={cfg.restore_file} is for the first launch: {cfg.save_dir} already holds "
            "checkpoint_last.pt, so this relaunch resumes from it (move it away to start again from the restore_file)"
        )
        cfg = _resume_config(cfg, "checkpoint_last.pt")
    if cfg.restore_file == "checkpoint_last.pt" and os.path.isdir(cfg.save_dir):
        if trainer.data_parallel_rank == 0:
            removed = remove_interrupted_saves(cfg.save_dir)
            if removed:
                logger.warning(f"removed {len(removed)} temporary file(s) of an interrupted save: {', '.join(removed)}")
        problem = checkpoint_load_problem(last) if os.path.exists(last) else None
        if problem is not None:
            fallback = newest_loadable_checkpoint(cfg.save_dir, exclude=[last], suffix=trainer.checkpoint_suffix)
            if fallback is None:
                raise UnreadableCheckpointError(
                    f"{last} cannot be loaded ({problem}) and no other checkpoint in {cfg.save_dir} loads; "
                    "move it away to start training afresh"
                )
            path, num_updates = fallback
            logger.warning(
                f"{last} cannot be loaded ({problem}); resuming from {path} (update {num_updates}), "
                "the newest checkpoint in the folder that loads"
            )
            cfg = _resume_config(cfg, path[: -len(f"{trainer.checkpoint_suffix}.pt")] + ".pt")
    return fairseq_load_checkpoint(cfg, trainer, **passthrough_args)


def training_finished(trainer, extra_state, epoch_itr) -> bool:
    """Whether the checkpoint just resumed from already reached ``max_update`` or ``max_epoch`` (and say so)."""
    optimization = trainer.cfg.optimization
    num_updates = trainer.get_num_updates()
    reached_update = bool(optimization.max_update) and num_updates >= optimization.max_update
    reached_epoch = bool(optimization.max_epoch) and epoch_itr.next_epoch_idx > optimization.max_epoch
    if extra_state is None or not (reached_update or reached_epoch):
        return False
    limit = f"max_update={optimization.max_update}" if reached_update else f"max_epoch={optimization.max_epoch}"
    epoch = epoch_itr.epoch if epoch_itr.iterations_in_epoch > 0 else epoch_itr.next_epoch_idx - 1
    logger.info(
        f"training already finished: the checkpoint is at update {num_updates}, epoch {epoch} ({limit}); "
        "nothing to do. Raise optimization.max_update or optimization.max_epoch to train further."
    )
    return True


def _resume_config(cfg, restore_file: str):
    """A copy of the checkpoint config that resumes from ``restore_file`` with nothing reset."""
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        # Resuming, not initialising: finetune_from_model and the resets only apply to a first launch.
        cfg.restore_file = restore_file
        cfg.finetune_from_model = None
        cfg.reset_optimizer = cfg.reset_lr_scheduler = cfg.reset_meters = cfg.reset_dataloader = False
    return cfg


# --- one training run per save_dir ----------------------------------------------------------------

#: The lock file a training run holds in its ``checkpoint.save_dir`` (hidden: never taken for a checkpoint).
SAVE_DIR_LOCK = ".training.lock"

#: save_dir lock file -> descriptor holding its flock, for the save dirs this process trains into.
_held_save_dir_locks: dict = {}


class SaveDirInUseError(InputError):
    """Another live training run holds the lock of this ``checkpoint.save_dir``."""


def lock_save_dir(save_dir: str) -> None:
    """Take the lock of ``save_dir`` for this training run, or raise :class:`SaveDirInUseError` naming the
    run that holds it (pid, host, start time).

    Two runs writing one save_dir would load each other's checkpoints and leave a ``checkpoint_last.pt``
    of neither run. The lock is an flock on ``{save_dir}/.training.lock``, which the kernel releases when
    its holder dies, so a run killed by SIGKILL or a pre-emption never blocks its rerun. It is held until
    the process ends (then the file is removed) or trains into another save_dir (a hydra multirun).
    Only rank 0 calls this (fairseq's ``verify_checkpoint_directory``): all ranks of a run share its save_dir.
    """
    path = os.path.join(os.path.realpath(save_dir), SAVE_DIR_LOCK)
    if path in _held_save_dir_locks:
        return
    fd = acquire_lock_file(path)
    if fd is None:
        try:
            with open(path, encoding="utf-8") as handle:
                holder = handle.read().strip() or "a run that has not yet written its details"
        except OSError:
            holder = "a run that has not yet written its details"
        raise SaveDirInUseError(
            f"{save_dir}: another training run is writing checkpoints here ({holder}; lock file {path}); "
            "wait for it to end or stop it, or give this run another checkpoint.save_dir"
        )
    for other_path in list(_held_save_dir_locks):  # this process trained into another save_dir before
        release_lock_file(other_path, _held_save_dir_locks.pop(other_path))
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {started}\n".encode(), 0)
    _held_save_dir_locks[path] = fd


@atexit.register
def release_save_dir_locks() -> None:
    """Release (and remove) every save_dir lock this process holds (at exit)."""
    for path in list(_held_save_dir_locks):
        release_lock_file(path, _held_save_dir_locks.pop(path))
