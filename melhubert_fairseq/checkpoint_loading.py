"""Reading checkpoints without running their code: ``torch.load(weights_only=True)`` with fairseq's allow-list.

fairseq calls ``torch.load`` without ``weights_only``, which ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``
silently turns into a full unpickler. Every checkpoint read here passes ``weights_only=True``
explicitly, with the allow-list of :func:`fairseq_checkpoint_safe_globals`; a file ``torch.save`` cannot
have written is refused before torch reads it (:func:`~melhubert_fairseq.file_sniffing.check_torch_file`),
and so is an original Mel-HuBERT ``.ckpt`` given where a fairseq checkpoint belongs
(:func:`load_fairseq_state`). :func:`load_checkpoint_to_cpu` and :func:`load_ema_from_checkpoint` are
fairseq's own functions on this loader; :mod:`melhubert_fairseq.fairseq_patches` installs them.
"""
from __future__ import annotations

import argparse
import collections
import os
import pickle
import re
import typing
from typing import Any, Optional, Sequence

import omegaconf
import torch
from fairseq.checkpoint_utils import _upgrade_state_dict
from fairseq.data import Dictionary
from fairseq.dataclass.utils import overwrite_args_by_name
from fairseq.distributed.utils import _TensorPlaceholder
from fairseq.file_io import PathManager

from melhubert_fairseq.errors import InputError, check_regular_file
from melhubert_fairseq.file_sniffing import CheckpointFormatError, check_torch_file
from melhubert_fairseq.models.mel_hubert import MODEL_NAME


class UnsafeCheckpointError(InputError, pickle.UnpicklingError):
    """The file holds pickled objects outside the allow-list; nothing in it was executed."""


def fairseq_checkpoint_safe_globals() -> list:
    """The classes a fairseq checkpoint (plain, re-saved or DDP) may contain."""
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
    # The fairseq types are passed here, not only registered globally: a tool may load without registering
    # the plugin with fairseq.
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




# --- loading --------------------------------------------------------------------------------------


def load_checkpoint_to_cpu(path: str, arg_overrides: Optional[dict] = None, load_on_all_ranks: bool = False) -> dict:
    """fairseq's ``checkpoint_utils.load_checkpoint_to_cpu`` with ``weights_only=True`` passed explicitly.

    Same contract: the state dict with ``cfg`` as an OmegaConf config (``arg_overrides``
    applied) and fairseq's upgrades of old layouts.
    """
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
        state["cfg"] = omegaconf.OmegaConf.create(state["cfg"], flags={"allow_objects": True})
        if arg_overrides is not None:
            overwrite_args_by_name(state["cfg"], arg_overrides)
    return _upgrade_state_dict(state)


def load_ema_from_checkpoint(fpath: str) -> dict:
    """fairseq's ``checkpoint_utils.load_ema_from_checkpoint`` (``ema.ema_seed_model``) with the weights-only
    loader: the checkpoint with its EMA weights (``extra_state["ema"]``, fp16 made fp32) as ``model``."""
    state = safe_torch_load(PathManager.get_local_path(fpath))
    ema = state["extra_state"]["ema"]
    params = collections.OrderedDict(
        (key, (p.float() if isinstance(p, torch.HalfTensor) else p).clone()) for key, p in ema.items()
    )
    if not params:
        raise InputError(f"Input checkpoint path '{fpath}' does not contain ema model weights, is this model trained with EMA?")
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

