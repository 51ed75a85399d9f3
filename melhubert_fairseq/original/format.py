"""The original Mel-HuBERT release's checkpoint format: its layout, its config keys, and reading it.

An original ``.ckpt`` (``pretrain_expert.save_model``) is a ``torch.save`` dict::

    model            state_dict of MelHuBERTModel ("Model" from the release's own 2022 pretraining script)
    Upstream_Config  {"hubert": {...}} (the 2022 release) or {"melhubert": {...}} (later code), the model yaml
    Optimizer        torch.optim.Adam state_dict (plain tensors, numbers, lists)
    Step             int, the global step
    Args             argparse.Namespace of train.py (strings, numbers, bools, None)
    Runner           the runner yaml (plain dicts, lists, numbers, strings)

It is read with ``torch.load(weights_only=True)``: the only class allowed
beyond torch's own plain types is ``argparse.Namespace``, so a file carrying any
other pickled object (for example one whose ``__reduce__`` runs a shell
command) is refused before anything in it is executed.

The original parameter names already equal ours (both follow fairseq's
wav2vec2 encoder), so conversion is a checked copy: every key must be known,
every shape must match, and nothing may be missing.

Two lineages wrote this format and differ in one setting. The original release
(the 2022 s3prl-era code, nervjack2/Speech-SSL-Compression ``melhubert/model.py``
and its descendants there) masks attention to the past when ``attention_type:
causal`` and keeps HuBERT's centred positional conv: that is our
``attention_type=causal`` with ``pos_conv_causal=false``, the default here. The
later nervjack2/MelHuBERT repository reads ``attention_type`` but never builds
a mask, so its "causal" checkpoints are bidirectional (``later_repo=True``).
Only the release wrote ``Upstream_Config["hubert"]``; the later repository
always writes ``"melhubert"``.

:mod:`melhubert_fairseq.original.convert` turns such a file into a fairseq
``mel_hubert`` checkpoint; :mod:`melhubert_fairseq.original.export` is the
inverse, refusing models the original code cannot run.
"""
from __future__ import annotations

import argparse
import os
import pickle
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch

from melhubert_fairseq.checkpoint_loading import safe_torch_load
from melhubert_fairseq.file_sniffing import CheckpointFormatError
from melhubert_fairseq.data.features import FBANK_NUM_MEL_BINS

#: The top-level key that marks an original checkpoint (fairseq checkpoints have ``model`` and ``cfg``).
UPSTREAM_CONFIG = "Upstream_Config"
#: Keys of ``Upstream_Config`` holding the model config: later code first, then the 2022 release's.
CONFIG_SECTIONS = ("melhubert", "hubert")
#: The only section nervjack2/MelHuBERT writes; ``"hubert"`` comes from the original release alone.
LATER_REPO_SECTION = "melhubert"
#: The section an export of a causal model writes: the release's, whose code (the only one that masks
#: attention for ``attention_type: causal``) reads it, and which the converter never reads as the later repository's.
RELEASE_SECTION = "hubert"
#: Stacked 10 ms frames per model frame that map between the formats: 10, 20 and 40 ms.
STACK_CHOICES = (1, 2, 4)

#: The original ``MelHuBERTConfig`` defaults (model.py), used for keys a file leaves out.
ORIGINAL_DEFAULTS: Dict[str, Any] = {
    "feat_emb_dim": FBANK_NUM_MEL_BINS,
    "pos_emb_type": "conv",
    "pos_conv_depth": 1,
    "conv_pos": 128,
    "conv_pos_groups": 16,
    "encoder_layers": 1,
    "encoder_embed_dim": 768,
    "encoder_ffn_embed_dim": 3072,
    "encoder_attention_heads": 12,
    "activation_fn": "gelu",
    "layer_norm_first": False,
    "attention_type": "original",
    "num_cluster": 512,
    "final_dim": 40,
    "pred_masked_weight": 1.0,
    "pred_nomask_weight": 0.0,
    "mask_prob": 0.8,
    "mask_length": 10,
    "mask_selection": "static",
    "mask_other": 0.0,
    "no_mask_overlap": False,
    "mask_min_space": 1,
    "skip_masked": False,
    "skip_nomask": True,
    "learnable_mask_emb": False,
    "mask_before_proj": True,
    "dropout": 0.1,
    "attention_dropout": 0.1,
    "activation_dropout": 0.1,
    "encoder_layerdrop": 0.0,
}

#: Original config keys copied to ``model.<same name>``, with the original's type cast.
MODEL_KEYS: Dict[str, type] = {
    "encoder_layers": int,
    "encoder_embed_dim": int,
    "encoder_ffn_embed_dim": int,
    "encoder_attention_heads": int,
    "activation_fn": str,
    "layer_norm_first": bool,
    "conv_pos": int,
    "conv_pos_groups": int,
    "pos_conv_depth": int,
    "dropout": float,
    "attention_dropout": float,
    "activation_dropout": float,
    "encoder_layerdrop": float,
    "mask_prob": float,
    "mask_length": int,
    "mask_selection": str,
    "mask_other": float,
    "mask_min_space": int,
    "learnable_mask_emb": bool,
    "mask_before_proj": bool,
}
#: Keys handled specially in :func:`convert_config` (or documented as unused by the original).
SPECIAL_KEYS = (
    "feat_emb_dim",
    "num_cluster",
    "attention_type",
    "pos_emb_type",
    "no_mask_overlap",
    "pred_masked_weight",
    "pred_nomask_weight",
    "skip_masked",
    "skip_nomask",
    "final_dim",  # read by the original config class but never used: final_proj maps to num_cluster
)
#: The optimizer class name fairseq records (``optimizer_history``): its Adam, which maps onto the original's torch Adam.
OPTIMIZER_CLASS = "FairseqAdam"
#: Activations the original's ``get_activation_fn`` (fairseq_code/utils.py) knows; fairseq's adds swish, relu_squared, gelu_fast.
ORIGINAL_ACTIVATIONS = ("relu", "gelu", "gelu_accurate", "tanh", "linear")
#: Model-config keys an export writes: those of the release's config_model_*.yaml
#: (``final_dim`` is read by the original but never used, and the release leaves it out).
EXPORTED_CONFIG_KEYS = tuple(key for key in ORIGINAL_DEFAULTS if key != "final_dim")
#: Registration order of the original's attention projections (fairseq's MultiheadAttention); ours is q, k, v, out.
ORIGINAL_ATTENTION_ORDER = ("k_proj", "v_proj", "q_proj", "out_proj")


def original_checkpoint_safe_globals() -> List[type]:
    """Classes beyond torch's plain types that an original ``.ckpt`` holds: only ``Args``' Namespace."""
    return [argparse.Namespace]


@dataclass
class OriginalCheckpoint:
    """The parts of an original ``.ckpt`` the converter uses."""

    path: str
    model_state: Dict[str, torch.Tensor]
    model_config: Dict[str, Any]
    config_section: str
    step: int
    optimizer_state: Optional[Dict[str, Any]]
    #: The training script's ``Args`` (None if the file has none): which code wrote the file shows there.
    args: Optional[argparse.Namespace] = None


def read_original_checkpoint(path: str) -> OriginalCheckpoint:
    """Safely load an original ``.ckpt`` and check its top-level layout."""
    state = safe_torch_load(path, original_checkpoint_safe_globals())
    if not isinstance(state, dict):
        raise CheckpointFormatError(f"{path}: expected a dict saved by the original release, got {type(state).__name__}")
    # The release's own pretraining script (July-December 2022) saved the weights as 'Model'; later code as 'model'.
    weights_key = "Model" if "model" not in state and "Model" in state else "model"
    missing = [key for key in (weights_key, UPSTREAM_CONFIG) if key not in state]
    if missing:
        raise CheckpointFormatError(
            f"{path}: not an original Mel-HuBERT checkpoint: missing {missing} (top-level keys: {sorted(state)})"
        )
    upstream = state[UPSTREAM_CONFIG]
    section = next((name for name in CONFIG_SECTIONS if isinstance(upstream, dict) and name in upstream), None)
    if section is None:
        keys = sorted(upstream) if isinstance(upstream, dict) else type(upstream).__name__
        raise CheckpointFormatError(f"{path}: Upstream_Config has none of {list(CONFIG_SECTIONS)} (found {keys})")
    model_state = state[weights_key]
    if not isinstance(model_state, dict) or not all(isinstance(v, torch.Tensor) for v in model_state.values()):
        raise CheckpointFormatError(f"{path}: {weights_key!r} is not a state_dict of tensors")
    return OriginalCheckpoint(
        path=path,
        model_state=dict(model_state),
        model_config=dict(upstream[section] or {}),
        config_section=section,
        step=int(state.get("Step") or 0),
        optimizer_state=state.get("Optimizer"),
        args=state.get("Args") if isinstance(state.get("Args"), argparse.Namespace) else None,
    )


def release_lineage_evidence(source: OriginalCheckpoint) -> Optional[str]:
    """What in the file shows it was written by the original release's code (which masks attention when
    ``attention_type: causal``) rather than by nervjack2/MelHuBERT; None when nothing does."""
    if source.config_section != LATER_REPO_SECTION:
        return (
            f"it holds Upstream_Config[{source.config_section!r}], which only the original release's code writes "
            f"(nervjack2/MelHuBERT always writes Upstream_Config[{LATER_REPO_SECTION!r}])"
        )
    if source.args is not None and hasattr(source.args, "multi_gpu"):
        return (
            "its Args has multi_gpu, a flag of the original release's train.py (and s3prl's run_pretrain.py) that "
            "nervjack2/MelHuBERT's train.py lacks"
        )
    return None


def looks_like_later_repo(source: OriginalCheckpoint) -> bool:
    """Args of nervjack2/MelHuBERT's train.py: frame_period without the release's multi_gpu."""
    return source.args is not None and hasattr(source.args, "frame_period") and not hasattr(source.args, "multi_gpu")



def is_original_state(state: Any) -> bool:
    """Whether a loaded checkpoint is in the original format: a dict with ``Upstream_Config``."""
    return isinstance(state, dict) and UPSTREAM_CONFIG in state


def holds_original_checkpoint(path: str) -> bool:
    """Whether the file at ``path`` loads (weights-only) as an original checkpoint; False for anything
    that does not load or holds something else."""
    try:
        return is_original_state(safe_torch_load(path, original_checkpoint_safe_globals()))
    except (ValueError, OSError, RuntimeError, pickle.UnpicklingError):
        return False


def is_old_mask_checkpoint(path: str) -> bool:
    """True for the original's ``*-oldmask`` files (batch-dependent masking)."""
    return "oldmask" in os.path.basename(path).lower()




def adam_moments(moments: Dict[str, Any]) -> Dict[str, Any]:
    """One parameter's Adam state as both formats store it: an int step (torch >= 1.12 accepts it too) and fp32 moments."""
    return {
        "step": int(torch.as_tensor(moments["step"]).item()),
        "exp_avg": moments["exp_avg"].detach().float().clone(),
        "exp_avg_sq": moments["exp_avg_sq"].detach().float().clone(),
    }


def adam_hyperparameters(group: Dict[str, Any], where: str) -> Dict[str, Any]:
    """lr, betas, eps, weight_decay of an Adam parameter group (torch's or fairseq's); amsgrad is refused."""
    if group.get("amsgrad", False):
        raise CheckpointFormatError(f"{where}: amsgrad Adam states are not converted")
    return {
        "lr": float(group["lr"]),
        "betas": tuple(float(b) for b in group["betas"]),
        "eps": float(group["eps"]),
        "weight_decay": float(group["weight_decay"]),
        "amsgrad": False,
    }


