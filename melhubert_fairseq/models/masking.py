"""Span masking of input frames, reproducible from the run's seed."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from fairseq.data.data_utils import compute_mask_indices


@dataclass(frozen=True)
class SpanMaskConfig:
    """Arguments of fairseq's ``compute_mask_indices`` as Mel-HuBERT uses them."""

    mask_prob: float
    mask_length: int
    mask_selection: str = "static"
    mask_other: float = 0.0
    no_mask_overlap: bool = False
    mask_min_space: int = 1
    require_same_masks: bool = False
    min_masks: int = 2


def check_span_mask_config(cfg: SpanMaskConfig) -> None:
    """Reject settings that fairseq main's ``compute_mask_indices`` cannot run with numpy >= 1.24."""
    # fairseq main's no-overlap path calls np.int and its 'uniform' path calls
    # Generator.randint; both were removed from numpy, so fail at build time
    # instead of in the first training step.
    if cfg.no_mask_overlap:
        raise ValueError(
            "no_mask_overlap=true is not supported: fairseq's compute_mask_indices uses np.int, "
            "which numpy >= 1.24 removed"
        )
    if cfg.mask_selection not in ("static", "normal", "poisson"):
        raise ValueError(
            f"mask_selection={cfg.mask_selection!r} is not supported (use static, normal or poisson; "
            "fairseq's 'uniform' path calls numpy's removed Generator.randint)"
        )
    if not 0.0 <= cfg.mask_prob < 1.0 or cfg.mask_length < 1:
        raise ValueError(f"mask_prob must be in [0, 1) and mask_length >= 1, got {cfg}")


def span_mask(
    cfg: SpanMaskConfig,
    shape: tuple,
    padding_mask: Optional[torch.Tensor],
    seed: Optional[int],
    epoch: int,
    sample_ids: Optional[torch.Tensor],
) -> torch.Tensor:
    """Boolean (B, T) mask of frames to hide; deterministic in (seed, epoch, sample id) when ids are given.

    With ``require_same_masks`` every utterance of the batch gets the same number
    of masked frames (the smallest one drawn), the original's old batch-dependent
    masking; otherwise each utterance is masked independently.
    """
    use_seed = seed is not None and sample_ids is not None
    mask = compute_mask_indices(
        shape,
        padding_mask.cpu() if padding_mask is not None else None,
        cfg.mask_prob,
        cfg.mask_length,
        cfg.mask_selection,
        cfg.mask_other,
        min_masks=cfg.min_masks,
        no_overlap=cfg.no_mask_overlap,
        min_space=cfg.mask_min_space,
        require_same_masks=cfg.require_same_masks,
        seed=seed if use_seed else None,
        epoch=epoch if use_seed else None,
        indices=sample_ids.cpu() if use_seed else None,
    )
    return torch.from_numpy(np.asarray(mask))
