"""Original Mel-HuBERT ``.ckpt`` -> fairseq ``mel_hubert`` checkpoint (:mod:`melhubert_fairseq.original.format`).

The original parameter names already equal ours (both follow fairseq's
wav2vec2 encoder), so conversion is a checked copy: every key must be known,
every shape must match, and nothing may be missing.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch
from fairseq.dataclass.configs import FairseqConfig
from omegaconf import OmegaConf, open_dict

from melhubert_fairseq.file_sniffing import CheckpointFormatError
from melhubert_fairseq.criterions.hard_label_masked_ce import CRITERION_NAME, HardLabelMaskedCe, HardLabelMaskedCeConfig
from melhubert_fairseq.data.features import FBANK_NUM_MEL_BINS, MeanStd
from melhubert_fairseq.errors import InputError
from melhubert_fairseq.models.components import pos_conv_lookahead
from melhubert_fairseq.models.mel_hubert import MODEL_NAME, MelHubertConfig, MelHubertModel
from melhubert_fairseq.original.format import (
    MODEL_KEYS,
    OPTIMIZER_CLASS,
    ORIGINAL_DEFAULTS,
    STACK_CHOICES,
    OriginalCheckpoint,
    adam_hyperparameters,
    adam_moments,
    is_old_mask_checkpoint,
    looks_like_later_repo,
    read_original_checkpoint,
    release_lineage_evidence,
)
from melhubert_fairseq.tasks.mel_hubert_pretraining import TASK_NAME
from melhubert_fairseq.tasks.pretraining_config import MelHubertPretrainingConfig


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
                "criterion_name": HardLabelMaskedCe.__name__,
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
            raise InputError(f"mean/std has {mean_std.dim} dims, the model reads {FBANK_NUM_MEL_BINS}-dim fbank")
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


