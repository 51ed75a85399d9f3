"""Every change this plugin makes to fairseq, in one place: what is replaced, and why.

fairseq's own checkpoint and command-line code is what ``fairseq-hydra-train``, ``fairseq-train`` and
``fairseq-validate`` run, so the plugin's guarantees (atomic saves, weights-only loads, safe resumes, one
``error:`` line for a user mistake) have to be put into fairseq's modules.
:func:`install_fairseq_patches` does that once per process (it is idempotent); it runs from
:func:`melhubert_fairseq.register_with_fairseq`. fairseq's originals are kept in :data:`_original`.

=========================================================  ====================================================
fairseq name                                               replaced by, and why
=========================================================  ====================================================
``checkpoint_utils.torch_persistent_save``                 an atomic, fsynced save
                                                           (:mod:`~melhubert_fairseq.checkpoint_saving`): a kill
                                                           or a full disk never leaves a truncated checkpoint
``checkpoint_utils.PathManager``                           ``checkpoint_saving.AtomicCopyPathManager``: fairseq's
                                                           copy of ``checkpoint_N_M.pt`` onto
                                                           ``checkpoint_last.pt`` is atomic too
``checkpoint_utils.load_checkpoint_to_cpu``                ``torch.load(weights_only=True)`` with an allow-list
                                                           (:mod:`~melhubert_fairseq.checkpoint_loading`):
                                                           fairseq's plain ``torch.load`` can run a file's code;
                                                           a ``mel_hubert`` config also gets its fbank
                                                           statistics and path (``record_checkpoint_in_config``)
``checkpoint_utils.load_ema_from_checkpoint``              the same weights-only loader for ``ema.ema_seed_model``
``checkpoint_utils.load_checkpoint``                       a resume that survives crashes and reruns
                                                           (:mod:`~melhubert_fairseq.checkpoint_resume`): stale
                                                           temporary files removed, an unreadable
                                                           ``checkpoint_last.pt`` skipped, a finished run ends
``checkpoint_utils.verify_checkpoint_directory``           also locks ``checkpoint.save_dir``: a second run into
                                                           it is refused with one ``error:`` line, exit 2
``fairseq_cli.train.train``                                returns at once for a run that already reached
                                                           ``max_update``/``max_epoch``; an ``InputError`` while
                                                           training is one ``error:`` line, exit 2
``distributed.utils.call_main``                            an ``InputError`` is one ``error:`` line, exit 2
                                                           (``fairseq-train``, ``fairseq-validate``, and hydra
                                                           jobs after the first), instead of a traceback
``tasks.setup_task`` (only when called by                  the same for a mistake found in the first
``fairseq_cli.train.main``)                                ``fairseq-hydra-train`` job by the task's setup,
                                                           ``build_model``, ``build_criterion`` or
                                                           ``load_dataset`` (wrapped on that task object):
                                                           fairseq imports the plugin inside that job's
                                                           ``main``, after ``call_main`` began, so the
                                                           ``call_main`` wrapper cannot see that job
=========================================================  ====================================================

Only :class:`~melhubert_fairseq.errors.InputError` becomes an ``error:`` line: any other exception (a real
bug) keeps its traceback. The line is printed and ``SystemExit(2)`` raised, which passes through Hydra's
own error report (it catches ``Exception`` only).
"""
from __future__ import annotations

import functools
import sys
from typing import Callable, NoReturn

from fairseq import checkpoint_utils, tasks
from fairseq.distributed import utils as distributed_utils

from melhubert_fairseq.checkpoint_loading import (
    load_checkpoint_to_cpu,
    load_ema_from_checkpoint,
    register_fairseq_safe_globals,
)
from melhubert_fairseq.checkpoint_resume import (
    SaveDirInUseError,
    lock_save_dir,
    resume_from_checkpoint,
    training_finished,
)
from melhubert_fairseq.checkpoint_saving import AtomicCopyPathManager, torch_persistent_save
from melhubert_fairseq.cli import format_user_error
from melhubert_fairseq.errors import InputError
from melhubert_fairseq.models.mel_hubert import record_checkpoint_in_config

#: fairseq's own functions, by patched name, kept for the cases delegated back to them.
_original: dict = {}

#: Trainers whose run already finished: the patched ``fairseq_cli.train.train`` returns at once for them.
_finished_trainers: set = set()


def exit_with_input_error(err: BaseException) -> NoReturn:
    """Print ``err`` as one ``error:`` line on stderr and end the run with exit code 2."""
    print(format_user_error(err), file=sys.stderr, flush=True)
    raise SystemExit(2) from None


def exit_on_input_error(function: Callable) -> Callable:
    """``function``, with an :class:`InputError` it raises turned into :func:`exit_with_input_error`."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except InputError as err:
            exit_with_input_error(err)

    wrapper._melhubert_original = function
    return wrapper


def _torch_persistent_save(obj, filename: str, async_write: bool = False) -> None:
    """``checkpoint_utils.torch_persistent_save``: atomic for local files, fairseq's own otherwise."""
    torch_persistent_save(obj, filename, async_write, _original["torch_persistent_save"])


def _load_checkpoint_to_cpu(path: str, arg_overrides=None, load_on_all_ranks: bool = False) -> dict:
    """``checkpoint_utils.load_checkpoint_to_cpu``: weights-only, and a ``mel_hubert`` config records its file."""
    state = load_checkpoint_to_cpu(path, arg_overrides, load_on_all_ranks)
    record_checkpoint_in_config(state, path)
    return state


def _load_checkpoint(cfg, trainer, **passthrough_args):
    """``checkpoint_utils.load_checkpoint`` (called by ``fairseq_cli.train.main`` only): the safe resume; a
    finished run trains nothing, and an ``InputError`` (a dataset that cannot be read) is one line."""
    try:
        extra_state, epoch_itr = resume_from_checkpoint(cfg, trainer, _original["load_checkpoint"], **passthrough_args)
    except InputError as err:
        exit_with_input_error(err)
    if training_finished(trainer, extra_state, epoch_itr):
        _finished_trainers.add(id(trainer))
        _patch_training_loop()  # fairseq_cli.train is imported by now: it is what called this
    return extra_state, epoch_itr


def _verify_checkpoint_directory(save_dir: str) -> None:
    """``checkpoint_utils.verify_checkpoint_directory`` (create ``save_dir``, check it is writable), then
    :func:`lock_save_dir`; a save_dir in use ends this run with one ``error:`` line, exit 2."""
    _original["verify_checkpoint_directory"](save_dir)
    try:
        lock_save_dir(save_dir)
    except SaveDirInUseError as err:
        exit_with_input_error(err)


def _setup_task(cfg, **kwargs):
    """``tasks.setup_task``; called by ``fairseq_cli.train.main`` (a training run), an ``InputError`` in the task's
    setup, or later in its ``build_model``, ``build_criterion`` or ``load_dataset``, is one line.

    Called from Python (``load_model_ensemble_and_task``), the task is fairseq's and errors are raised as they are."""
    train_main = getattr(sys.modules.get("fairseq_cli.train"), "main", None)
    if train_main is None or sys._getframe(1).f_code is not train_main.__code__:
        return _original["setup_task"](cfg, **kwargs)
    task = exit_on_input_error(_original["setup_task"])(cfg, **kwargs)
    # main calls these on the task next, before anything else of ours it looks up at call time.
    for name in ("build_model", "build_criterion", "load_dataset"):
        setattr(task, name, exit_on_input_error(getattr(task, name)))
    return task


def _patch_training_loop() -> None:
    """Replace ``fairseq_cli.train.train`` (the epoch loop, looked up at each call), if it is imported."""
    train_module = sys.modules.get("fairseq_cli.train")
    if train_module is None or hasattr(train_module.train, "_melhubert_original"):
        return
    original_train = train_module.train

    @exit_on_input_error
    def train(cfg, trainer, task, epoch_itr):
        if id(trainer) in _finished_trainers:
            _finished_trainers.discard(id(trainer))
            return [None], True
        return original_train(cfg, trainer, task, epoch_itr)

    train_module.train = train


def install_fairseq_patches() -> None:
    """Put every replacement listed above into fairseq (idempotent)."""
    register_fairseq_safe_globals()
    _patch_training_loop()
    if _original:
        return
    _original["torch_persistent_save"] = checkpoint_utils.torch_persistent_save
    _original["load_checkpoint"] = checkpoint_utils.load_checkpoint
    _original["load_checkpoint_to_cpu"] = checkpoint_utils.load_checkpoint_to_cpu
    _original["verify_checkpoint_directory"] = checkpoint_utils.verify_checkpoint_directory
    _original["call_main"] = distributed_utils.call_main
    _original["setup_task"] = tasks.setup_task
    checkpoint_utils.torch_persistent_save = _torch_persistent_save
    checkpoint_utils.load_checkpoint = _load_checkpoint
    checkpoint_utils.load_checkpoint_to_cpu = _load_checkpoint_to_cpu
    checkpoint_utils.load_ema_from_checkpoint = load_ema_from_checkpoint
    checkpoint_utils.verify_checkpoint_directory = _verify_checkpoint_directory
    checkpoint_utils.PathManager = AtomicCopyPathManager
    distributed_utils.call_main = exit_on_input_error(_original["call_main"])
    tasks.setup_task = _setup_task
