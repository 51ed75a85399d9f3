"""Span masking of input frames, reproducible from the run's seed.

The masking rule and its draws are fairseq's ``compute_mask_indices`` (the one HuBERT
and the original Mel-HuBERT use), seeded per utterance by (seed, update, sample id):
fairseq draws each utterance from ``np.random.default_rng(hash((seed, epoch, index)) % 1e6)``,
so a mask depends only on those three and not on the batch it is in, the device or the
process (Python's hash of a tuple of ints is not salted), and a resumed run draws the
masks the uninterrupted one would. fairseq's fine-tuning encoders pass no sample ids; the model then
takes the seed from torch's generator and the batch rows as ids
(``MelHubertModel.mask_seed_and_ids``). The masks are drawn on the CPU (a numpy loop over the
batch's utterances) and copied to the model's device.

A whole-batch vectorised path with its own hash RNG used to sit beside this one; it saved
0.6 ms per 8 x 750-frame batch on CPU, 0.001% of a Base training step there
(``python benchmarks/bench_masking.py --step``, benchmarks/README.md), so it was removed.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from enum import Enum
from typing import Any, Optional

import numpy as np
import torch
from fairseq.data.data_utils import compute_mask_indices

from melhubert_fairseq.errors import InputError


@dataclass(frozen=True)
class SpanMaskConfig:
    """Arguments of fairseq's ``compute_mask_indices`` as Mel-HuBERT uses them, named as the model config names them."""

    mask_prob: float
    mask_length: int
    mask_selection: str = "static"
    mask_other: float = 0.0
    no_mask_overlap: bool = False
    mask_min_space: int = 1
    require_same_masks: bool = False
    mask_min_masks: int = 2

    @classmethod
    def from_model_config(cls, cfg: Any, prefix: str = "mask", **fixed: Any) -> "SpanMaskConfig":
        """The masking fields of a model config, read by name: ``mask_prob``, ``no_mask_overlap``, ...;
        ``prefix="mask_channel"`` reads ``mask_channel_prob``, ``no_mask_channel_overlap``, ... instead.
        ``fixed`` gives the fields the config has no field for (a missing one is an error)."""
        values = dict(fixed)
        for item in fields(cls):
            if item.name not in values:
                value = getattr(cfg, item.name.replace("mask", prefix, 1))
                values[item.name] = str(value) if isinstance(value, Enum) else value  # fairseq's ChoiceEnum values
        return cls(**values)


class SpanMaskError(InputError):
    """An utterance too short to mask: every frame would be hidden. ``row`` is its batch row (None: unknown)."""

    def __init__(self, message: str, row: Optional[int] = None) -> None:
        super().__init__(message)
        self.row = row


def check_span_mask_config(cfg: SpanMaskConfig, what: Optional[str] = None) -> None:
    """Reject, at build time, settings fairseq's ``compute_mask_indices`` cannot run (see the messages;
    ``what``, if given, names the masking they are about)."""
    prefix = f"{what}: " if what else ""
    # fairseq main's no-overlap path calls np.int and its 'uniform' path calls
    # Generator.randint; both were removed from numpy, so fail at build time
    # instead of in the first training step.
    if cfg.no_mask_overlap:
        raise InputError(
            f"{prefix}no_mask_overlap=true is not supported: fairseq's compute_mask_indices uses np.int, "
            "which numpy >= 1.24 removed"
        )
    if cfg.mask_selection not in ("static", "normal", "poisson"):
        raise InputError(
            f"{prefix}mask_selection={cfg.mask_selection!r} is not supported (use static, normal or poisson; "
            "fairseq's 'uniform' path calls numpy's removed Generator.randint)"
        )
    if not 0.0 <= cfg.mask_prob < 1.0 or cfg.mask_length < 1:
        raise InputError(f"{prefix}mask_prob must be in [0, 1) and mask_length >= 1, got {cfg}")


def span_mask(
    cfg: SpanMaskConfig,
    shape: tuple,
    padding_mask: Optional[torch.Tensor],
    seed: Optional[int],
    epoch: int,
    sample_ids: Optional[torch.Tensor],
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Boolean (B, T) mask of frames to hide, from fairseq's ``compute_mask_indices``; deterministic in
    (seed, epoch, sample id) when both ``seed`` and ``sample_ids`` are given, unseeded (as fairseq) otherwise.

    With ``require_same_masks`` every utterance of the batch gets the same number
    of masked frames (the smallest one drawn), the original's old batch-dependent
    masking; otherwise each utterance is masked independently. The mask is
    returned on ``device`` (default: the padding mask's device, else CPU).
    """
    if device is None:
        device = padding_mask.device if padding_mask is not None else torch.device("cpu")
    use_seed = seed is not None and sample_ids is not None
    try:
        mask = compute_mask_indices(
            shape,
            padding_mask.cpu() if padding_mask is not None else None,
            cfg.mask_prob,
            cfg.mask_length,
            cfg.mask_selection,
            cfg.mask_other,
            min_masks=cfg.mask_min_masks,
            no_overlap=cfg.no_mask_overlap,
            min_space=cfg.mask_min_space,
            require_same_masks=cfg.require_same_masks,
            seed=seed if use_seed else None,
            epoch=epoch if use_seed else None,
            # one copy, not a device sync per utterance in fairseq's loop
            indices=sample_ids.cpu() if use_seed else None,
        )
    except ValueError as err:
        if "entire sequence is masked" in str(err):
            raise SpanMaskError(str(err)) from None
        raise
    return torch.from_numpy(np.asarray(mask)).to(device)
