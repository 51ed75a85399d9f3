"""fairseq ``mel_hubert`` checkpoint -> the original release's ``.ckpt`` layout (:mod:`melhubert_fairseq.original.format`);
the inverse of :mod:`melhubert_fairseq.original.convert`, refusing models the original code cannot run
(:func:`original_incompatibilities`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from omegaconf import OmegaConf

from melhubert_fairseq.checkpoint_loading import load_fairseq_state, require_mel_hubert
from melhubert_fairseq.file_sniffing import CheckpointFormatError
from melhubert_fairseq.data.features import FBANK_NUM_MEL_BINS, MeanStd, validate_mean_std
from melhubert_fairseq.models.components import pos_conv_lookahead
from melhubert_fairseq.original.convert import build_model
from melhubert_fairseq.original.format import (
    CONFIG_SECTIONS,
    EXPORTED_CONFIG_KEYS,
    MODEL_KEYS,
    OPTIMIZER_CLASS,
    ORIGINAL_ACTIVATIONS,
    ORIGINAL_ATTENTION_ORDER,
    ORIGINAL_DEFAULTS,
    RELEASE_SECTION,
    STACK_CHOICES,
    UPSTREAM_CONFIG,
    adam_hyperparameters,
    adam_moments,
    holds_original_checkpoint,
)


def read_mel_hubert_checkpoint(
    path: str, purpose: str = "only Mel-HuBERT models have an original format"
) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Safely load a fairseq checkpoint holding a ``mel_hubert`` model -> (checkpoint dict, resolved cfg);
    ``purpose`` ends the error for another model."""
    try:
        state = load_fairseq_state(path)
    except CheckpointFormatError:
        # The loader says "convert it" for an original file; here the point is that it needs no export.
        if holds_original_checkpoint(path):
            raise CheckpointFormatError(
                f"{path}: already in the original Mel-HuBERT format (it has {UPSTREAM_CONFIG})"
            ) from None
        raise
    require_mel_hubert(path, state, purpose)
    return state, OmegaConf.to_container(OmegaConf.create(state["cfg"]), resolve=True, enum_to_str=True)


def original_incompatibilities(model_cfg: Dict[str, Any]) -> List[str]:
    """What in our model config the original code (model.py, module.py) cannot build, train or compute the same way."""
    problems: List[str] = []
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
    exported[UPSTREAM_CONFIG] = {RELEASE_SECTION if causal else CONFIG_SECTIONS[0]: config}
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
