"""Checkpoint files: safe loading, crash-proof saving, and resuming without manual repair.

Registering the plugin (``melhubert_fairseq.register_with_fairseq``, which runs once both the package
and fairseq are imported) installs these into fairseq (:func:`install_fairseq_checkpoint_io`), because
fairseq's own checkpoint code is what ``fairseq-hydra-train`` runs:

* **Saving.** fairseq writes ``checkpoint_N_M.pt`` and then copies it onto
  ``checkpoint_last.pt`` / ``checkpoint_best.pt`` with a plain copy onto the live
  file, so a kill or a full disk during the copy leaves a truncated
  ``checkpoint_last.pt`` that every rerun fails to load. Here every checkpoint file,
  the copies included, is written to a temporary file in the same folder, fsynced,
  and renamed over the old one (then the folder is fsynced): a crash at any instant
  leaves the old file or the new one.
* **Loading.** fairseq calls ``torch.load`` without ``weights_only``, which
  ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` silently turns into a full unpickler. Every
  checkpoint fairseq reads here (training resume, ``load_model_ensemble_and_task``,
  fine-tuning's ``w2v_path``, EMA's ``ema_seed_model``) goes through ``torch.load(weights_only=True)`` passed
  explicitly, with the allow-list of :func:`fairseq_checkpoint_safe_globals`. A file ``torch.save``
  cannot have written (a ``.npy``, a k-means model, a joblib pickle, text) is refused before torch reads
  it, naming what it is (:func:`check_torch_file`), and so is an original Mel-HuBERT ``.ckpt`` given
  where a fairseq checkpoint belongs (:func:`load_fairseq_state`).
* **Resuming.** Before fairseq resumes from ``checkpoint_last.pt``, temporary files of
  a crashed save are removed; if ``checkpoint_last.pt`` cannot be loaded (written by
  an older fairseq, or damaged), training resumes from the newest checkpoint in the
  folder that loads, and says so. A relaunch resumes from ``checkpoint_last.pt`` even
  when the first launch started from ``checkpoint.restore_file``. A run that already
  reached ``max_update`` or ``max_epoch`` says it is finished and ends without
  training or writing.
* **One run per save_dir.** A training run locks its ``checkpoint.save_dir``
  (:func:`lock_save_dir`); a second run into it is refused with one line naming the
  holder. A killed run's lock dies with it.
"""
from __future__ import annotations

import argparse
import atexit
import collections
import copy
import logging
import os
import pickle
import re
import shutil
import socket
import sys
import time
import typing
import zipfile
from typing import Any, List, Optional, Sequence, Tuple

import torch

from melhubert_fairseq.atomic_output import atomic_output
from melhubert_fairseq.errors import check_regular_file
from melhubert_fairseq.models.mel_hubert import MODEL_NAME

logger = logging.getLogger(__name__)

#: Temporary files a crashed save can leave in a checkpoint folder: ours
#: (``.checkpoint_last.pt.<random>.tmp``, from :func:`atomic_output`) and fairseq's own
#: (``checkpoint_last.pt.tmp``).
STALE_TEMP_FILE = re.compile(r"^(\..+\.pt\.[^.]+\.tmp|.+\.pt\.tmp)$")

#: Checkpoint file names fairseq writes in a save dir (epoch, epoch+update, best, last, keep-best).
CHECKPOINT_FILE = re.compile(r"^checkpoint.*\.pt$")


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The file holds pickled objects outside the allow-list; nothing in it was executed."""


class CheckpointFormatError(ValueError):
    """A file is not the kind of checkpoint it was given as."""


class UnreadableCheckpointError(ValueError):
    """``checkpoint_last.pt`` cannot be loaded and no other checkpoint in its folder can."""


# --- what a checkpoint may contain ----------------------------------------------------------------


def fairseq_checkpoint_safe_globals() -> list:
    """The classes a fairseq checkpoint (plain, re-saved or DDP) may contain."""
    import omegaconf
    from fairseq.data import Dictionary
    from fairseq.distributed.utils import _TensorPlaceholder

    return [
        Dictionary,
        omegaconf.DictConfig,
        omegaconf.ListConfig,
        omegaconf.base.ContainerMetadata,
        omegaconf.base.Metadata,
        omegaconf.nodes.AnyNode,
        typing.Any,
        collections.defaultdict,
        # Needed as pickled globals by DDP runs: without them the 2-process resume in
        # tests/test_distributed.py fails.
        dict,
        list,
        int,
        _TensorPlaceholder,
    ]


def register_fairseq_safe_globals() -> None:
    """Add the fairseq checkpoint types to torch's weights-only allow-list."""
    torch.serialization.add_safe_globals(fairseq_checkpoint_safe_globals())


#: How a torch.save file before torch 1.6 (not a zip archive) starts: pickle protocol 2, then torch's magic number.
LEGACY_TORCH_HEADER = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"


def describe_file(path: str) -> Optional[str]:
    """None for a file ``torch.save`` can have written, else what the file is instead (for the error)."""
    with open(path, "rb") as handle:
        head = handle.read(64)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        if any(name.endswith("/data.pkl") for name in names):
            return None  # torch >= 1.6 writes a zip archive holding <name>/data.pkl
        if names and all(name.endswith(".npy") for name in names):
            return "a NumPy .npz archive"
        return "a zip archive without torch's data.pkl"
    if head.startswith(LEGACY_TORCH_HEADER):
        return None
    if head.startswith(b"PK\x03\x04"):
        return "a truncated or damaged zip archive (no central directory)"
    if head.startswith(b"\x93NUMPY"):
        return describe_npy(path)
    if head.startswith(b"\x80"):
        return "a Python pickle (pickle.dump / joblib output, e.g. a scikit-learn k-means model), not torch.save's format"
    if not head:
        return "an empty file"
    text = head.decode("utf-8", errors="replace").rstrip("\ufffd")  # the 64 bytes may cut a character
    if all(char.isprintable() or char in "\t\n\r" for char in text) and text.strip():
        first_line = text.strip().splitlines()[0]
        if is_kmeans_sidecar(path):
            return "the JSON sidecar of a k-means model (written by melhubert-learn-kmeans)"
        kind = "a JSON file" if first_line.startswith(("{", "[")) else "a text file"
        return f"{kind} (it starts with {first_line[:40]!r})"
    return f"not a format torch writes (it starts with {head[:8]!r})"


def describe_npy(path: str) -> str:
    """``a NumPy .npy array of shape ...``, naming a k-means model when its learn_kmeans sidecar is beside it."""
    import numpy as np

    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)  # the header only; no data is read
    except ValueError:
        return "a NumPy .npy file"
    shape = tuple(array.shape)
    what = f"a NumPy .npy array of shape {shape}, {array.dtype}"
    if is_kmeans_sidecar(os.path.splitext(path)[0] + ".json"):
        what = f"a k-means model (centroids {shape}, written by melhubert-learn-kmeans)"
    return what


def is_kmeans_sidecar(path: str) -> bool:
    """Whether ``path`` is the JSON sidecar melhubert-learn-kmeans writes next to its centroids."""
    from melhubert_fairseq.kmeans import KMEANS_FORMAT  # only to name what a wrong file is

    try:
        with open(path, encoding="utf-8") as handle:
            return f'"{KMEANS_FORMAT}"' in handle.read(4096)
    except (OSError, UnicodeDecodeError):
        return False


def check_torch_file(path: str) -> None:
    """Refuse a file that ``torch.save`` cannot have written (a ``.npy``, a k-means model, a text file, a
    plain pickle, an empty file) with one line saying what it is, before torch reads any of it."""
    kind = describe_file(path)
    if kind is not None:
        raise CheckpointFormatError(f"{path}: not a torch checkpoint: it is {kind}")


def safe_torch_load(path: str, extra_safe_globals: Sequence[Any] = (), mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)`` on CPU; refusals name the offending pickled globals.

    ``extra_safe_globals`` join torch's allow-list for the rest of the process (it never shrinks).
    ``mmap=True`` reads the structure and leaves tensor data on disk (cheap integrity check).
    """
    check_regular_file(path, what="checkpoint")
    check_torch_file(path)
    # Added to torch's process-wide allow-list for good, not with the ``safe_globals`` context manager: on exit
    # that one removes its globals again, also ones another caller had added, so a later load in the same
    # process (a fine-tuning resume reading a Dictionary) would be refused.
    torch.serialization.add_safe_globals(list(extra_safe_globals))
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        allowed = set(torch.serialization.get_safe_globals()) | set(extra_safe_globals)
        allowed_names = {f"{getattr(g, '__module__', '')}.{getattr(g, '__qualname__', g)}" for g in allowed}
        try:
            found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # legacy (non-zip) files cannot be scanned; the refusal still stands
            found = []
        offending = [name for name in found if name not in allowed_names]
        if not offending:  # a legacy file cannot be scanned: take the global torch's message names
            offending = re.findall(r"GLOBAL ([\w.]+)", str(err))
        # Not torch's message itself: it advises weights_only=False, which would run the file's code.
        detail = ", ".join(offending) if offending else "objects the weights-only loader cannot read"
        raise UnsafeCheckpointError(
            f"{path}: refusing to load: it contains pickled objects outside the allow-list ({detail}). "
            "Loading it would let the file run code; nothing was executed."
        ) from None


def load_fairseq_state(path: str, mmap: bool = False) -> dict:
    """A fairseq checkpoint's state dict through :func:`safe_torch_load`; an original Mel-HuBERT ``.ckpt``
    or a file without fairseq's ``model`` and ``cfg`` (or pre-hydra ``args``) is refused naming what it is.

    ``mmap=True`` leaves tensor data on disk where the file allows it (torch's zip format)."""
    # argparse.Namespace: fairseq before hydra kept its args in one (and the original release its Args).
    # The fairseq types are passed here, not only registered globally: a tool may load before the
    # plugin registered with fairseq (registration waits for fairseq's import).
    safe_globals = [argparse.Namespace, *fairseq_checkpoint_safe_globals()]
    try:
        state = safe_torch_load(path, safe_globals, mmap=mmap)
    except RuntimeError:
        if not mmap:
            raise
        state = safe_torch_load(path, safe_globals)  # mmap needs torch's zip format; an older file is read whole
    if isinstance(state, dict) and "Upstream_Config" in state:
        raise CheckpointFormatError(
            f"{path}: an original Mel-HuBERT checkpoint (it has Upstream_Config), not a fairseq one: "
            "convert it with melhubert-convert-original first"
        )
    if not isinstance(state, dict) or "model" not in state or not ("cfg" in state or "args" in state):
        holds = f"entries {sorted(map(str, state))[:8]}" if isinstance(state, dict) else f"a {type(state).__name__}"
        raise CheckpointFormatError(f"{path}: not a fairseq checkpoint (no 'model' and 'cfg' entries; it holds {holds})")
    return state


def require_mel_hubert(path: str, state: dict, purpose: str) -> None:
    """Refuse a fairseq checkpoint of another model (``cfg.model._name``, or pre-hydra ``args.arch``), naming it;
    ``purpose`` ends the message."""
    cfg = state.get("cfg")
    model = cfg.get("model") if hasattr(cfg, "get") else None
    name = model.get("_name") if hasattr(model, "get") else getattr(state.get("args"), "arch", None)
    if name != MODEL_NAME:
        what = f"a fairseq {name!r} checkpoint" if name else "a checkpoint naming no fairseq model (cfg.model._name)"
        raise CheckpointFormatError(f"{path}: {what}, not 'mel_hubert': {purpose}")


# --- saving ---------------------------------------------------------------------------------------


def atomic_torch_save(obj: Any, path: str, overwrite: bool = True) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsynced, then renamed onto it (an existing
    ``path`` is only replaced with ``overwrite``): a crash never leaves a truncated checkpoint."""
    with atomic_output(path, overwrite=overwrite, mode="wb") as handle:
        torch.save(obj, handle)


def atomic_copy(src_path: str, dst_path: str) -> None:
    """Copy ``src_path`` onto ``dst_path`` through a temporary file: ``dst_path`` is never partial."""
    with open(src_path, "rb") as source, atomic_output(dst_path, overwrite=True, mode="wb") as target:
        shutil.copyfileobj(source, target, length=16 << 20)


def _fairseq_path_manager_with_atomic_copy():
    """fairseq's PathManager whose ``copy`` of local files is :func:`atomic_copy`."""
    from fairseq.file_io import PathManager

    class AtomicCopyPathManager(PathManager):
        """PathManager for fairseq's checkpoint module: copies onto checkpoint files are atomic."""

        @staticmethod
        def copy(src_path: str, dst_path: str, overwrite: bool = False) -> bool:
            if PathManager.path_requires_pathmanager(src_path) or PathManager.path_requires_pathmanager(dst_path):
                return PathManager.copy(src_path, dst_path, overwrite=overwrite)
            if not overwrite and os.path.exists(dst_path):
                return False
            atomic_copy(src_path, dst_path)
            return True

    return AtomicCopyPathManager


def torch_persistent_save(obj: Any, filename: str, async_write: bool = False) -> None:
    """fairseq's ``checkpoint_utils.torch_persistent_save``, atomic and fsynced for local files."""
    from fairseq.file_io import PathManager

    if async_write or PathManager.path_requires_pathmanager(filename):
        return _original["torch_persistent_save"](obj, filename, async_write=async_write)
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


# --- loading --------------------------------------------------------------------------------------


def load_checkpoint_to_cpu(path: str, arg_overrides: Optional[dict] = None, load_on_all_ranks: bool = False) -> dict:
    """fairseq's ``checkpoint_utils.load_checkpoint_to_cpu`` with ``weights_only=True`` passed explicitly.

    Same contract: the state dict with ``cfg`` as an OmegaConf config (``arg_overrides``
    applied) and fairseq's upgrades of old layouts. A ``mel_hubert`` checkpoint's config
    also gets its fbank statistics and path (:func:`record_checkpoint_in_config`).
    """
    from fairseq.checkpoint_utils import _upgrade_state_dict
    from fairseq.dataclass.utils import overwrite_args_by_name
    from fairseq.file_io import PathManager
    from omegaconf import OmegaConf

    local_path = PathManager.get_local_path(path)
    if local_path != path and PathManager.path_requires_pathmanager(path):
        # A cached copy of a remote file may be stale (fairseq's reasoning): fetch it again.
        try:
            os.remove(local_path)
        except FileNotFoundError:
            pass
        if load_on_all_ranks:
            torch.distributed.barrier()
        local_path = PathManager.get_local_path(path)
    state = load_fairseq_state(local_path)
    if "args" in state and state["args"] is not None and arg_overrides is not None:
        for arg_name, arg_val in arg_overrides.items():
            setattr(state["args"], arg_name, arg_val)
    if "cfg" in state and state["cfg"] is not None:
        state["cfg"] = OmegaConf.create(state["cfg"], flags={"allow_objects": True})
        if arg_overrides is not None:
            overwrite_args_by_name(state["cfg"], arg_overrides)
        from melhubert_fairseq.models.mel_hubert import record_checkpoint_in_config

        record_checkpoint_in_config(state, path)
    return _upgrade_state_dict(state)


def load_ema_from_checkpoint(fpath: str) -> dict:
    """fairseq's ``checkpoint_utils.load_ema_from_checkpoint`` (``ema.ema_seed_model``) with the weights-only
    loader: the checkpoint with its EMA weights (``extra_state["ema"]``, fp16 made fp32) as ``model``."""
    from fairseq.file_io import PathManager

    state = safe_torch_load(PathManager.get_local_path(fpath))
    ema = state["extra_state"]["ema"]
    params = collections.OrderedDict(
        (key, (p.float() if isinstance(p, torch.HalfTensor) else p).clone()) for key, p in ema.items()
    )
    if not params:
        raise ValueError(f"Input checkpoint path '{fpath}' does not contain ema model weights, is this model trained with EMA?")
    state["model"] = params
    return state


def checkpoint_load_problem(path: str) -> Optional[str]:
    """None if ``path`` loads as a checkpoint (structure read, tensor data left on disk), else why not."""
    try:
        try:
            state = safe_torch_load(path, mmap=True)
        except (CheckpointFormatError, UnsafeCheckpointError):
            raise
        except Exception:  # a file system that cannot mmap: read it all before judging it
            state = safe_torch_load(path)
    except UnsafeCheckpointError:
        raise
    except Exception as err:  # truncated, empty, not a zip, not a checkpoint: all mean "cannot resume from it"
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'unreadable'}"
    if not isinstance(state, dict) or "model" not in state:
        return "not a fairseq checkpoint (no 'model')"
    return None


def checkpoint_num_updates(path: str) -> int:
    """The update count a loadable fairseq checkpoint was saved at."""
    state = safe_torch_load(path, mmap=True)
    history = state.get("optimizer_history") or [{}]
    return int(history[-1].get("num_updates", 0))


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
        if STALE_TEMP_FILE.match(name) and os.path.isfile(path):
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue
            removed.append(name)
    return removed


# --- resuming -------------------------------------------------------------------------------------


def resume_from_checkpoint(cfg, trainer, **passthrough_args):
    """fairseq's ``checkpoint_utils.load_checkpoint`` (resume), made to survive crashes and reruns.

    A relaunch resumes from ``{save_dir}/checkpoint_last.pt`` even when the first launch
    started from ``checkpoint.restore_file`` (which, like ``finetune_from_model``, is then
    for the first launch only). Temporary files of a killed save are removed; an
    unreadable ``checkpoint_last.pt`` falls back to the newest loadable checkpoint; a run
    that already reached ``max_update`` / ``max_epoch`` trains nothing and writes nothing.
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
    extra_state, epoch_itr = _original["load_checkpoint"](cfg, trainer, **passthrough_args)
    optimization = trainer.cfg.optimization
    num_updates = trainer.get_num_updates()
    reached_update = bool(optimization.max_update) and num_updates >= optimization.max_update
    reached_epoch = bool(optimization.max_epoch) and epoch_itr.next_epoch_idx > optimization.max_epoch
    if extra_state is not None and (reached_update or reached_epoch):
        limit = f"max_update={optimization.max_update}" if reached_update else f"max_epoch={optimization.max_epoch}"
        epoch = epoch_itr.epoch if epoch_itr.iterations_in_epoch > 0 else epoch_itr.next_epoch_idx - 1
        logger.info(
            f"training already finished: the checkpoint is at update {num_updates}, epoch {epoch} ({limit}); "
            "nothing to do. Raise optimization.max_update or optimization.max_epoch to train further."
        )
        _skip_training(trainer)
    return extra_state, epoch_itr


def _resume_config(cfg, restore_file: str):
    """A copy of the checkpoint config that resumes from ``restore_file`` with nothing reset."""
    from omegaconf import open_dict

    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        # Resuming, not initialising: finetune_from_model and the resets only apply to a first launch.
        cfg.restore_file = restore_file
        cfg.finetune_from_model = None
        cfg.reset_optimizer = cfg.reset_lr_scheduler = cfg.reset_meters = cfg.reset_dataloader = False
    return cfg


#: Trainers whose run already finished: fairseq_cli.train's ``train`` returns at once for them.
_finished_trainers: set = set()


def _skip_training(trainer) -> None:
    """Make fairseq_cli.train's epoch loop stop before its first update for ``trainer``: ``main`` then ends
    normally (a hydra multirun goes on to its next job) without training or saving."""
    _finished_trainers.add(id(trainer))
    train_module = sys.modules.get("fairseq_cli.train")
    if train_module is None or getattr(train_module.train, "_melhubert_original", None) is not None:
        return
    original_train = train_module.train

    def train(cfg, trainer, task, epoch_itr):
        if id(trainer) in _finished_trainers:
            _finished_trainers.discard(id(trainer))
            return [None], True
        return original_train(cfg, trainer, task, epoch_itr)

    train._melhubert_original = original_train
    train_module.train = train


# --- one training run per save_dir ----------------------------------------------------------------

#: The lock file a training run holds in its ``checkpoint.save_dir`` (hidden: never taken for a checkpoint).
SAVE_DIR_LOCK = ".training.lock"

#: save_dir lock file -> descriptor holding its flock, for the save dirs this process trains into.
_held_save_dir_locks: dict = {}


class SaveDirInUseError(RuntimeError):
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
    from melhubert_fairseq.atomic_output import acquire_lock_file, release_lock_file

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
    from melhubert_fairseq.atomic_output import release_lock_file

    for path in list(_held_save_dir_locks):
        release_lock_file(path, _held_save_dir_locks.pop(path))


def verify_checkpoint_directory(save_dir: str) -> None:
    """fairseq's ``checkpoint_utils.verify_checkpoint_directory`` (create ``save_dir``, check it is writable),
    then :func:`lock_save_dir`; a save_dir in use ends this run with one ``error:`` line, exit 2."""
    _original["verify_checkpoint_directory"](save_dir)
    try:
        lock_save_dir(save_dir)
    except SaveDirInUseError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


# --- installation ---------------------------------------------------------------------------------

#: fairseq's own functions, kept for the cases delegated back to them.
_original: dict = {}


def install_fairseq_checkpoint_io() -> None:
    """Route fairseq's checkpoint saving, loading and resuming through this module (idempotent)."""
    from fairseq import checkpoint_utils

    register_fairseq_safe_globals()
    if _original:
        return
    _original["torch_persistent_save"] = checkpoint_utils.torch_persistent_save
    _original["load_checkpoint"] = checkpoint_utils.load_checkpoint
    _original["load_checkpoint_to_cpu"] = checkpoint_utils.load_checkpoint_to_cpu
    _original["verify_checkpoint_directory"] = checkpoint_utils.verify_checkpoint_directory
    checkpoint_utils.torch_persistent_save = torch_persistent_save
    checkpoint_utils.load_checkpoint = resume_from_checkpoint
    checkpoint_utils.load_checkpoint_to_cpu = load_checkpoint_to_cpu
    checkpoint_utils.load_ema_from_checkpoint = load_ema_from_checkpoint
    checkpoint_utils.verify_checkpoint_directory = verify_checkpoint_directory
    checkpoint_utils.PathManager = _fairseq_path_manager_with_atomic_copy()
