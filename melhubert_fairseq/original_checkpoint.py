"""Checkpoints of the original Mel-HuBERT release <-> fairseq ``mel_hubert`` checkpoints, both directions.

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
always writes ``"melhubert"``. :func:`export_original_checkpoint`
is the inverse: our checkpoint -> the original layout, refusing models the
original code cannot run (:func:`original_incompatibilities`).
"""
from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from omegaconf import OmegaConf, open_dict

from melhubert_fairseq.checkpoint_loading import (  # noqa: F401  (re-exported)
    UnsafeCheckpointError,
    load_fairseq_state,
    require_mel_hubert,
    safe_torch_load,
)
from melhubert_fairseq.data.features import FBANK_NUM_MEL_BINS, MeanStd, validate_mean_std
from melhubert_fairseq.errors import InputError
from melhubert_fairseq.file_sniffing import CheckpointFormatError  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)

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

TASK_NAME = "mel_hubert_pretraining"
MODEL_NAME = "mel_hubert"
CRITERION_NAME = "hard_label_masked_ce"
#: Class names fairseq's trainer compares before it restores an optimizer state.
CRITERION_CLASS = "HardLabelMaskedCe"
OPTIMIZER_CLASS = "FairseqAdam"


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
    missing = [key for key in (weights_key, "Upstream_Config") if key not in state]
    if missing:
        raise CheckpointFormatError(
            f"{path}: not an original Mel-HuBERT checkpoint: missing {missing} (top-level keys: {sorted(state)})"
        )
    upstream = state["Upstream_Config"]
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


@dataclass
class ConvertedConfig:
    """Overrides of our task, model and criterion configs equivalent to an original model config."""

    task: Dict[str, Any]
    model: Dict[str, Any]
    criterion: Dict[str, Any]
    notes: List[str] = field(default_factory=list)


def convert_config(
    original: Dict[str, Any], old_mask: bool = False, ignore_keys: Sequence[str] = (), later_repo: bool = False
) -> ConvertedConfig:
    """Map an original model config (``Upstream_Config[section]``) onto ours; unknown keys are an error.

    ``later_repo``: the file was trained by nervjack2/MelHuBERT, whose ``attention_type: causal``
    masks nothing, so it converts as bidirectional; otherwise as the release's causal model."""
    unknown = sorted(set(original) - set(ORIGINAL_DEFAULTS) - set(ignore_keys))
    if unknown:
        raise CheckpointFormatError(
            f"unknown model config keys {unknown}: they may change the architecture, so the conversion stops "
            "(pass --ignore-config-key KEY for each one you have checked is irrelevant)"
        )
    cfg = {**ORIGINAL_DEFAULTS, **{k: v for k, v in original.items() if k not in ignore_keys}}
    notes: List[str] = []
    feat_emb_dim = int(cfg["feat_emb_dim"])
    stack, remainder = divmod(feat_emb_dim, FBANK_NUM_MEL_BINS)
    if remainder or stack not in STACK_CHOICES:
        raise CheckpointFormatError(
            f"feat_emb_dim={feat_emb_dim} is not 40 (10 ms), 80 (20 ms) or 160 (40 ms) stacked 40-dim fbank"
        )
    if str(cfg["pos_emb_type"]) != "conv":
        raise CheckpointFormatError(f"pos_emb_type={cfg['pos_emb_type']!r}: only 'conv' exists in the original")
    model = {key: cast(cfg[key]) for key, cast in MODEL_KEYS.items()}
    if model["encoder_layers"] < 1:
        raise CheckpointFormatError("encoder_layers=0 (the original's GELU-only model) has no transformer to convert")
    from melhubert_fairseq.models.components import pos_conv_lookahead  # here: it imports fairseq

    attention_type = str(cfg["attention_type"])
    if attention_type not in ("original", "causal"):
        raise CheckpointFormatError(f"attention_type={cfg['attention_type']!r} is unknown to the original")
    model["attention_type"], model["pos_conv_causal"] = "original", None
    if attention_type == "causal" and later_repo:
        notes.append(
            "attention_type=causal converted as bidirectional (--later-repo): nervjack2/MelHuBERT never builds an "
            "attention mask, so its causal setting had no effect"
        )
    elif attention_type == "causal":
        # The release's model.py masks attention to the past; its positional conv stays centred (SamePad).
        model["attention_type"], model["pos_conv_causal"] = "causal", False
        notes.append(
            "attention_type=causal converted as the original release's causal model: attention masked to the past, "
            f"centred positional conv reading {pos_conv_lookahead(model['conv_pos'], model['pos_conv_depth'])} frames "
            "ahead (model.pos_conv_causal=false); a file trained by nervjack2/MelHuBERT, whose causal setting masks "
            "nothing, needs --later-repo"
        )
    model["no_mask_overlap"] = False
    if bool(cfg["no_mask_overlap"]):
        notes.append("no_mask_overlap=true is not supported by fairseq main with numpy 2; set to false (training masks only)")
    # The original hard-codes min_masks=2; its *-oldmask checkpoints predate per-utterance masking.
    model["mask_min_masks"] = 2
    model["require_same_masks"] = bool(old_mask)
    task = {"stack_frames": stack, "feat_dim": FBANK_NUM_MEL_BINS, "num_classes": int(cfg["num_cluster"])}
    criterion = {
        "pred_masked_weight": 0.0 if bool(cfg["skip_masked"]) else float(cfg["pred_masked_weight"]),
        "pred_nomask_weight": 0.0 if bool(cfg["skip_nomask"]) else float(cfg["pred_nomask_weight"]),
    }
    return ConvertedConfig(task=task, model=model, criterion=criterion, notes=notes)


#: Config keys that change the network a state_dict is loaded into (shapes alone do not catch all).
ARCHITECTURE_KEYS = (
    "encoder_layers", "encoder_embed_dim", "encoder_ffn_embed_dim", "encoder_attention_heads", "activation_fn",
    "layer_norm_first", "attention_type", "pos_conv_causal", "conv_pos", "conv_pos_groups", "pos_conv_depth",
    "learnable_mask_emb", "mask_before_proj", "require_same_masks",
)


def describe_attention(model_cfg: Dict[str, Any]) -> str:
    """``bidirectional``, ``causal attention + centred conv`` (the release's causal model) or ``strictly causal``."""
    if str(model_cfg["attention_type"]) != "causal":
        return "bidirectional"
    if model_cfg.get("pos_conv_causal") is False:
        return "causal attention + centred positional conv"
    return "strictly causal"


def training_overrides(converted: ConvertedConfig) -> List[str]:
    """fairseq-hydra-train overrides that rebuild the converted network (training reads the command line, not the file)."""
    overrides = [f"task.stack_frames={converted.task['stack_frames']}", f"task.num_classes={converted.task['num_classes']}"]
    for key in ARCHITECTURE_KEYS:
        value = converted.model[key]
        text = "null" if value is None else str(value).lower() if isinstance(value, bool) else value
        overrides.append(f"model.{key}={text}")
    return overrides


def build_fairseq_cfg(converted: ConvertedConfig, seed: int = 1337) -> Dict[str, Any]:
    """A full fairseq config (as a plain dict, like the trainer saves it) for the converted model."""
    from fairseq.dataclass.configs import FairseqConfig

    from melhubert_fairseq.criterions.hard_label_masked_ce import HardLabelMaskedCeConfig
    from melhubert_fairseq.models.mel_hubert import MelHubertConfig
    from melhubert_fairseq.tasks.mel_hubert_pretraining import MelHubertPretrainingConfig

    cfg = OmegaConf.structured(FairseqConfig)
    with open_dict(cfg):
        cfg.common.seed = seed
        # No training data belongs to a converted model; train with task.data=... as usual.
        cfg.task = OmegaConf.structured(MelHubertPretrainingConfig(data="", **converted.task))
        cfg.task._name = TASK_NAME
        cfg.model = OmegaConf.structured(MelHubertConfig(**converted.model))
        cfg.model._name = MODEL_NAME
        cfg.criterion = OmegaConf.structured(HardLabelMaskedCeConfig(**converted.criterion))
        cfg.criterion._name = CRITERION_NAME
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def build_model(fairseq_cfg: Dict[str, Any]):
    """Instantiate our model from a fairseq config dict (task fields resolved into the model config)."""
    from melhubert_fairseq.models.mel_hubert import MelHubertConfig, MelHubertModel

    model_cfg = OmegaConf.merge(
        OmegaConf.structured(MelHubertConfig),
        {k: v for k, v in fairseq_cfg["model"].items() if k != "_name"},
    )
    return MelHubertModel(model_cfg)


def convert_state_dict(
    original: Dict[str, torch.Tensor], target: Dict[str, torch.Tensor], where: str
) -> Dict[str, torch.Tensor]:
    """Checked copy of original weights into our state_dict layout; unknown or missing keys are an error.

    ``pre_extract_proj`` is absent in the original when ``feat_emb_dim`` equals the
    model width (it feeds frames straight to the encoder): it becomes an identity.
    """
    converted: Dict[str, torch.Tensor] = {}
    own_buffers = {"fbank_mean_std"}  # ours only: filled from --mean-std or left unknown (NaN)
    unknown = sorted(set(original) - set(target))
    missing = sorted(set(target) - set(original) - own_buffers)
    if "pre_extract_proj.weight" in missing and "pre_extract_proj.bias" in missing:
        weight = target["pre_extract_proj.weight"]
        if weight.shape[0] == weight.shape[1]:
            converted["pre_extract_proj.weight"] = torch.eye(weight.shape[0], dtype=weight.dtype)
            converted["pre_extract_proj.bias"] = torch.zeros(weight.shape[0], dtype=weight.dtype)
            missing = [k for k in missing if not k.startswith("pre_extract_proj.")]
    if unknown or missing:
        raise CheckpointFormatError(
            f"{where}: state_dict does not match the converted config: unknown keys {unknown}, missing keys {missing}"
        )
    wrong = [
        f"{name} {tuple(original[name].shape)} vs {tuple(target[name].shape)}"
        for name in original
        if original[name].shape != target[name].shape
    ]
    if wrong:
        raise CheckpointFormatError(f"{where}: parameter shapes differ from the config: {wrong}")
    for name, tensor in target.items():
        if name in original:
            converted[name] = original[name].detach().to(tensor.dtype).clone()
        elif name not in converted:
            converted[name] = tensor.clone()
    return converted


def convert_optimizer_state(
    optimizer_state: Dict[str, Any],
    original_names: Sequence[str],
    target_names: Sequence[str],
    where: str,
) -> Dict[str, Any]:
    """The original torch Adam state re-indexed for fairseq's Adam over our parameter order.

    The original built ``Adam(model.parameters())`` and its state_dict holds only
    parameters, so optimizer index i is the i-th key of its ``model`` state_dict;
    every moment's shape is checked against that parameter.
    """
    groups = optimizer_state.get("param_groups") if isinstance(optimizer_state, dict) else None
    if not groups or len(groups) != 1:
        raise CheckpointFormatError(f"{where}: Optimizer must hold one parameter group, got {groups and len(groups)}")
    group = groups[0]
    if len(group["params"]) != len(original_names):
        raise CheckpointFormatError(
            f"{where}: Optimizer covers {len(group['params'])} parameters, the model has {len(original_names)}"
        )
    index_of_name = {name: index for index, name in enumerate(target_names)}
    state: Dict[int, Dict[str, Any]] = {}
    for position, param_id in enumerate(group["params"]):
        moments = optimizer_state["state"].get(param_id)
        if not moments:
            continue  # never stepped: fairseq's Adam initialises it lazily
        name = original_names[position]
        if name not in index_of_name:
            raise CheckpointFormatError(f"{where}: optimizer entry for unknown parameter {name}")
        state[index_of_name[name]] = adam_moments(moments)
    hyper = adam_hyperparameters(group, where)
    return {"state": state, "param_groups": [{**hyper, "params": list(range(len(target_names)))}]}


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


def fairseq_checkpoint_state(
    model_state: Dict[str, torch.Tensor],
    fairseq_cfg: Dict[str, Any],
    num_updates: int,
    optimizer_state: Optional[Dict[str, Any]] = None,
    extra: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """A checkpoint dict in the layout of fairseq's ``Trainer.state_dict`` (plain types only).

    ``optimizer_history`` must not be empty (``checkpoint_utils._upgrade_state_dict``
    reads its last entry); ``extra_state.train_iterator`` starts at epoch 1, so the
    file can also be given as ``checkpoint.restore_file`` without resetting the dataloader.
    """
    state = {
        "args": None,
        "cfg": fairseq_cfg,
        "model": model_state,
        "criterion": None,
        "optimizer_history": [
            {
                "criterion_name": CRITERION_CLASS,
                "optimizer_name": OPTIMIZER_CLASS,
                "lr_scheduler_state": {"best": None},
                "num_updates": int(num_updates),
            }
        ],
        "task_state": {},
        "extra_state": {
            "train_iterator": {"version": 2, "epoch": 1, "iterations_in_epoch": 0, "shuffle": True},
            **(extra or {}),
        },
    }
    if optimizer_state is not None:
        state["last_optimizer_state"] = optimizer_state
    return state


def is_old_mask_checkpoint(path: str) -> bool:
    """True for the original's ``*-oldmask`` files (batch-dependent masking)."""
    return "oldmask" in os.path.basename(path).lower()


@dataclass
class ConversionResult:
    """A converted checkpoint dict plus what the converter had to decide."""

    state: Dict[str, Any]
    config: ConvertedConfig
    source: OriginalCheckpoint


def convert_original_checkpoint(
    path: str,
    mean_std: Optional[MeanStd] = None,
    old_mask: Optional[bool] = None,
    with_optimizer: bool = False,
    ignore_config_keys: Sequence[str] = (),
    later_repo: bool = False,
) -> ConversionResult:
    """Original ``.ckpt`` -> fairseq ``mel_hubert`` checkpoint dict (``old_mask`` None: guess from the name;
    ``later_repo``: trained by nervjack2/MelHuBERT, see :func:`convert_config`)."""
    source = read_original_checkpoint(path)
    evidence = release_lineage_evidence(source)
    if later_repo and evidence:
        raise InputError(
            f"{path}: --later-repo contradicts the checkpoint: {evidence}, and that code masks attention when "
            "attention_type is causal; convert it without --later-repo"
        )
    old_mask = is_old_mask_checkpoint(path) if old_mask is None else old_mask
    converted = convert_config(
        source.model_config, old_mask=old_mask, ignore_keys=ignore_config_keys, later_repo=later_repo
    )
    if converted.model["attention_type"] == "causal" and looks_like_later_repo(source):
        converted.notes.append(
            "its Args look like nervjack2/MelHuBERT's train.py (frame_period, no multi_gpu): if that code trained "
            "this file, its causal setting masked nothing; convert again with --later-repo"
        )
    fairseq_cfg = build_fairseq_cfg(converted)
    model = build_model(fairseq_cfg)
    model_state = convert_state_dict(source.model_state, model.state_dict(), path)
    if mean_std is not None:
        if mean_std.dim != FBANK_NUM_MEL_BINS:
            raise ValueError(f"mean/std has {mean_std.dim} dims, the model reads {FBANK_NUM_MEL_BINS}-dim fbank")
        model_state["fbank_mean_std"] = torch.from_numpy(mean_std.to_array())
    model.load_state_dict(model_state)  # final check: the converted dict builds our model
    optimizer = None
    if with_optimizer:
        if not source.optimizer_state:
            raise CheckpointFormatError(f"{path}: has no Optimizer state to convert")
        optimizer = convert_optimizer_state(
            source.optimizer_state,
            list(source.model_state),
            [name for name, p in model.named_parameters() if p.requires_grad],
            path,
        )
        if optimizer["param_groups"][0]["weight_decay"]:
            converted.notes.append(
                "weight_decay != 0: the original's torch Adam adds it to the gradient, fairseq's Adam decays weights directly"
            )
    extra = {"converted_from": os.path.basename(path), "original_step": source.step}
    state = fairseq_checkpoint_state(model_state, fairseq_cfg, source.step, optimizer, extra)
    return ConversionResult(state=state, config=converted, source=source)


# Export: a fairseq ``mel_hubert`` checkpoint -> the original release's ``.ckpt`` layout.

#: Activations the original's ``get_activation_fn`` (fairseq_code/utils.py) knows; fairseq's adds swish, relu_squared, gelu_fast.
ORIGINAL_ACTIVATIONS = ("relu", "gelu", "gelu_accurate", "tanh", "linear")
#: Model-config keys an export writes: those of the release's config_model_*.yaml
#: (``final_dim`` is read by the original but never used, and the release leaves it out).
EXPORTED_CONFIG_KEYS = tuple(key for key in ORIGINAL_DEFAULTS if key != "final_dim")
#: Registration order of the original's attention projections (fairseq's MultiheadAttention); ours is q, k, v, out.
ORIGINAL_ATTENTION_ORDER = ("k_proj", "v_proj", "q_proj", "out_proj")


def read_mel_hubert_checkpoint(
    path: str, purpose: str = "only Mel-HuBERT models have an original format"
) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Safely load a fairseq checkpoint holding a ``mel_hubert`` model -> (checkpoint dict, resolved cfg);
    ``purpose`` ends the error for another model."""
    try:
        state = load_fairseq_state(path)
    except CheckpointFormatError as err:
        if "Upstream_Config" in str(err):  # the one loader says "convert it": here the point is it needs no export
            raise CheckpointFormatError(f"{path}: already in the original Mel-HuBERT format (it has Upstream_Config)") from None
        raise
    require_mel_hubert(path, state, purpose)
    return state, OmegaConf.to_container(OmegaConf.create(state["cfg"]), resolve=True, enum_to_str=True)


def original_incompatibilities(model_cfg: Dict[str, Any]) -> List[str]:
    """What in our model config the original code (model.py, module.py) cannot build, train or compute the same way."""
    problems: List[str] = []
    from melhubert_fairseq.models.components import pos_conv_lookahead  # here: it imports fairseq

    causal_attention = str(model_cfg["attention_type"]) == "causal"
    causal_conv = causal_attention if model_cfg.get("pos_conv_causal") is None else bool(model_cfg["pos_conv_causal"])
    if causal_conv:
        problems.append(
            f"attention_type={model_cfg['attention_type']} with a causal positional conv (model.pos_conv_causal): the "
            "original's positional conv is always centred (SamePad) and would read "
            f"{pos_conv_lookahead(int(model_cfg['conv_pos']), int(model_cfg['pos_conv_depth']))} frames ahead; only "
            "the release's causal model (attention_type=causal, model.pos_conv_causal=false) or a bidirectional one exports"
        )
    if str(model_cfg.get("prediction_head", "cluster_ids")) != "cluster_ids":
        problems.append(
            f"prediction_head={model_cfg['prediction_head']}: the original's only pretraining head is final_proj over "
            "num_cluster k-means ids"
        )
    if int(model_cfg["pos_conv_depth"]) != 1:
        problems.append(
            f"pos_conv_depth={model_cfg['pos_conv_depth']}: the original's multi-layer positional conv calls an "
            "undefined LayerNorm (module.py) and cannot be built"
        )
    if str(model_cfg["activation_fn"]) not in ORIGINAL_ACTIVATIONS:
        problems.append(
            f"activation_fn={model_cfg['activation_fn']}: the original knows only {', '.join(ORIGINAL_ACTIVATIONS)}"
        )
    if not bool(model_cfg["mask_before_proj"]):
        problems.append(
            "mask_before_proj=false: the original's masked forward after the projection uses an undefined "
            "teacher_mask_indices (model.py), so it cannot train the model"
        )
    if int(model_cfg["feat_dim"]) != FBANK_NUM_MEL_BINS:
        problems.append(f"feat_dim={model_cfg['feat_dim']}: the original reads {FBANK_NUM_MEL_BINS}-bin fbank frames")
    if int(model_cfg["stack_frames"]) not in STACK_CHOICES:
        problems.append(
            f"stack_frames={model_cfg['stack_frames']}: only 10, 20 and 40 ms frames ({STACK_CHOICES} stacked) "
            "map onto the original's feat_emb_dim"
        )
    if int(model_cfg["encoder_layers"]) < 1:
        problems.append("encoder_layers=0: the original makes an empty encoder a bare GELU, which its forward cannot call")
    return problems


def export_config(cfg: Dict[str, Any], where: str) -> Tuple[Dict[str, Any], List[str]]:
    """Our resolved fairseq cfg -> (the original's ``Upstream_Config['melhubert']``, notes); the inverse of :func:`convert_config`."""
    model, criterion = cfg["model"], cfg.get("criterion") or {}
    problems = original_incompatibilities(model)
    if problems:
        raise CheckpointFormatError(f"{where}: the original Mel-HuBERT code cannot run this model: {'; '.join(problems)}")
    masked = float(criterion.get("pred_masked_weight", ORIGINAL_DEFAULTS["pred_masked_weight"]))
    nomask = float(criterion.get("pred_nomask_weight", ORIGINAL_DEFAULTS["pred_nomask_weight"]))
    exported = {key: cast(model[key]) for key, cast in MODEL_KEYS.items()}
    exported.update(
        feat_emb_dim=FBANK_NUM_MEL_BINS * int(model["stack_frames"]),
        num_cluster=int(model["num_classes"]),
        pos_emb_type="conv",
        attention_type=str(model["attention_type"]),
        no_mask_overlap=bool(model["no_mask_overlap"]),
        pred_masked_weight=masked,
        pred_nomask_weight=nomask,
        skip_masked=masked == 0.0,
        skip_nomask=nomask == 0.0,
    )
    notes: List[str] = []
    if int(model["stack_frames"]) == 4:
        notes.append(
            "40 ms frames (feat_emb_dim=160): the original's MelHuBERTModel runs them, but its train.py -f and "
            "extract_feature.py make only 10/20 ms input; feed it 4 consecutive 10 ms frames concatenated per frame"
        )
    if bool(model["learnable_mask_emb"]):
        notes.append("learnable_mask_emb: the original creates the mask embedding with .to('cuda'), so it builds this model only with a GPU")
    if int(model["mask_min_masks"]) != 2:
        notes.append(f"mask_min_masks={model['mask_min_masks']}: the original always masks at least 2 spans when it trains")
    return {key: exported[key] for key in EXPORTED_CONFIG_KEYS}, notes


def original_key_order(names: Sequence[str]) -> List[str]:
    """Our parameter names in the original's registration order: only each layer's attention projections move."""
    first_of_block: Dict[str, int] = {}
    keys = []
    for index, name in enumerate(names):
        parts = name.split(".")
        if "self_attn" in parts and parts[parts.index("self_attn") + 1] in ORIGINAL_ATTENTION_ORDER:
            at = parts.index("self_attn")
            first = first_of_block.setdefault(".".join(parts[: at + 1]), index)
            keys.append(((first, ORIGINAL_ATTENTION_ORDER.index(parts[at + 1]), index), name))
        else:
            keys.append(((index, 0, index), name))
    return [name for _, name in sorted(keys)]


def export_state_dict(model_state: Dict[str, torch.Tensor], where: str) -> Dict[str, torch.Tensor]:
    """Our state_dict as the original's ``model``: its key order, float32, without our ``fbank_mean_std``.

    The original has no ``pre_extract_proj`` when ``feat_emb_dim`` equals the model
    width (frames go straight into the encoder), so ours must then be the identity
    the converter put there.
    """
    exported = {name: model_state[name].detach().float() for name in original_key_order(list(model_state))}
    exported.pop("fbank_mean_std", None)
    weight, bias = exported["pre_extract_proj.weight"], exported["pre_extract_proj.bias"]
    if weight.shape[0] == weight.shape[1]:
        if not (torch.equal(weight, torch.eye(weight.shape[0])) and not bias.any()):
            raise CheckpointFormatError(
                f"{where}: the original Mel-HuBERT code cannot run this model: feat_emb_dim = encoder_embed_dim = "
                f"{weight.shape[0]}, where the original has no pre_extract_proj, and this model's is not the identity"
            )
        del exported["pre_extract_proj.weight"], exported["pre_extract_proj.bias"]
    return exported


def export_optimizer_state(
    state: Dict[str, Any], parameters: Dict[str, torch.Tensor], original_names: Sequence[str], where: str
) -> Dict[str, Any]:
    """fairseq's Adam state (indexed in our parameter order) as the original's torch Adam over its own order.

    ``parameters`` are our trainable parameters in fairseq's optimizer order (the
    model's ``named_parameters``), ``original_names`` the original model's
    parameters in its order; the inverse of :func:`convert_optimizer_state`.
    """
    optimizer = state.get("last_optimizer_state")
    if not optimizer:
        raise CheckpointFormatError(f"{where}: has no optimizer state to export (drop --with-optimizer)")
    optimizer_name = (state.get("optimizer_history") or [{}])[-1].get("optimizer_name")
    if optimizer_name != OPTIMIZER_CLASS:
        raise CheckpointFormatError(f"{where}: optimizer {optimizer_name}: only {OPTIMIZER_CLASS} maps onto the original's torch Adam")
    groups = optimizer.get("param_groups") or []
    ours = list(parameters)
    shapes_match = len(groups) == 1 and len(groups[0]["params"]) == len(ours) and all(
        optimizer["state"][param_id]["exp_avg"].shape == parameters[name].shape
        for param_id, name in zip(groups[0]["params"], ours)
        if param_id in optimizer["state"]
    )
    if not shapes_match:
        raise CheckpointFormatError(
            f"{where}: the optimizer state does not hold one Adam state per parameter (fp16/bf16 training keeps "
            "flattened fp32 copies); export without --with-optimizer"
        )
    param_id_of = dict(zip(ours, groups[0]["params"]))
    exported: Dict[int, Dict[str, Any]] = {}
    for position, name in enumerate(original_names):
        moments = optimizer["state"].get(param_id_of[name])
        if moments:
            exported[position] = adam_moments(moments)
    hyper = adam_hyperparameters(groups[0], where)
    return {"state": exported, "param_groups": [{**hyper, "params": list(range(len(original_names)))}]}


@dataclass
class ExportResult:
    """An original-format checkpoint dict plus what the exporter found."""

    state: Dict[str, Any]
    config: Dict[str, Any]
    #: Corpus fbank mean/std stored in our checkpoint (None: unknown); the original keeps them in a separate .npy.
    mean_std: Optional[MeanStd]
    #: The model masks the original's old batch-dependent way, which the original format records only in the file name.
    old_mask: bool
    notes: List[str]


def export_original_checkpoint(path: str, with_optimizer: bool = False) -> ExportResult:
    """fairseq ``mel_hubert`` checkpoint -> original ``.ckpt`` dict (``model``, ``Upstream_Config``, ``Step``[, ``Optimizer``]).

    ``Args`` and ``Runner`` are left out: they describe an original training run
    (train.py -e resumes one), the original's loaders never read them, and the
    ``argparse.Namespace`` in ``Args`` would be the file's only pickled class.
    """
    state, cfg = read_mel_hubert_checkpoint(path)
    config, notes = export_config(cfg, path)
    model = build_model(cfg)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise CheckpointFormatError(f"{path}: its weights do not fit its own config: {str(err).splitlines()[0]}") from None
    history = state.get("optimizer_history") or [{}]
    model_state = export_state_dict(model.state_dict(), path)
    exported: Dict[str, Any] = {}  # in the order pretrain_expert.save_model writes
    if with_optimizer:
        trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
        original_names = [name for name in model_state if name in trainable]
        exported["Optimizer"] = export_optimizer_state(state, trainable, original_names, path)
        if exported["Optimizer"]["param_groups"][0]["weight_decay"]:
            notes.append(
                "weight_decay != 0: fairseq's Adam decays weights directly, the original's torch Adam adds it to the gradient"
            )
    exported["Step"] = int(history[-1].get("num_updates", 0))
    exported["model"] = model_state
    causal = config["attention_type"] == "causal"
    exported["Upstream_Config"] = {RELEASE_SECTION if causal else CONFIG_SECTIONS[0]: config}
    if causal:
        notes.append(
            f"attention_type=causal: written as Upstream_Config[{RELEASE_SECTION!r}], the original release's section: "
            "its code masks attention as this model does (nervjack2/MelHuBERT would run it bidirectionally)"
        )
    stats = model.fbank_stats()
    mean_std = validate_mean_std(stats[0].numpy(), stats[1].numpy(), f"{path} fbank_mean_std") if stats else None
    return ExportResult(
        state=exported, config=config, mean_std=mean_std, old_mask=bool(cfg["model"]["require_same_masks"]), notes=notes
    )
