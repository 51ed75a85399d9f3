"""Span masking of input frames, reproducible from the run's seed.

Two implementations of the same masking rule (fairseq's ``compute_mask_indices``,
the one HuBERT and the original Mel-HuBERT use):

* ``fairseq``: fairseq's own function, a Python/numpy loop over the utterances
  of the batch, run on the CPU and copied to the model's device.
* ``vectorized``: whole-batch tensor ops on the model's device, no Python loop
  over utterances or frames. Same rule (number of spans, start range, clipping
  at the utterance end, ``mask_min_masks``, padding, ``require_same_masks``), drawn
  from a counter-based hash of (seed, update, sample id, frame), so a mask
  depends only on those and not on the batch it is in or on the device.
  The random draws differ from fairseq's numpy generator: the two agree in
  distribution, not bit for bit (tests/test_speed_equivalence.py checks the
  statistics).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from enum import Enum
from typing import Any, Optional

import numpy as np
import torch
from fairseq.data.data_utils import compute_mask_indices


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
    mask_impl: str = "vectorized"

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


class SpanMaskError(ValueError):
    """An utterance too short to mask: every frame would be hidden. ``row`` is its batch row (None: unknown)."""

    def __init__(self, message: str, row: Optional[int] = None) -> None:
        super().__init__(message)
        self.row = row


#: Values of ``SpanMaskConfig.mask_impl`` (and the model's ``mask_impl``).
MASK_IMPLS = ("vectorized", "fairseq")


def check_span_mask_config(cfg: SpanMaskConfig, what: Optional[str] = None) -> None:
    """Reject, at build time, settings neither implementation can run (see the messages; ``what``, if given,
    names the masking they are about)."""
    prefix = f"{what}: " if what else ""
    # fairseq main's no-overlap path calls np.int and its 'uniform' path calls
    # Generator.randint; both were removed from numpy, so fail at build time
    # instead of in the first training step.
    if cfg.no_mask_overlap:
        raise ValueError(
            f"{prefix}no_mask_overlap=true is not supported: fairseq's compute_mask_indices uses np.int, "
            "which numpy >= 1.24 removed"
        )
    if cfg.mask_selection not in ("static", "normal", "poisson"):
        raise ValueError(
            f"{prefix}mask_selection={cfg.mask_selection!r} is not supported (use static, normal or poisson; "
            "fairseq's 'uniform' path calls numpy's removed Generator.randint)"
        )
    if not 0.0 <= cfg.mask_prob < 1.0 or cfg.mask_length < 1:
        raise ValueError(f"{prefix}mask_prob must be in [0, 1) and mask_length >= 1, got {cfg}")
    if cfg.mask_impl not in MASK_IMPLS:
        raise ValueError(f"{prefix}mask_impl={cfg.mask_impl!r} is not one of {MASK_IMPLS}")
    if cfg.mask_impl == "vectorized" and cfg.mask_selection != "static":
        raise ValueError(
            f"{prefix}mask_impl=vectorized draws fixed-length (mask_selection=static) spans only; "
            f"set mask_impl=fairseq for mask_selection={cfg.mask_selection!r}"
        )


def span_mask(
    cfg: SpanMaskConfig,
    shape: tuple,
    padding_mask: Optional[torch.Tensor],
    seed: Optional[int],
    epoch: int,
    sample_ids: Optional[torch.Tensor],
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Boolean (B, T) mask of frames to hide; deterministic in (seed, epoch, sample id) when ids are given.

    With ``require_same_masks`` every utterance of the batch gets the same number
    of masked frames (the smallest one drawn), the original's old batch-dependent
    masking; otherwise each utterance is masked independently. ``cfg.mask_impl``
    picks the implementation; the mask is returned on ``device`` (default: the
    padding mask's device, else CPU).
    """
    if device is None:
        device = padding_mask.device if padding_mask is not None else torch.device("cpu")
    if cfg.mask_impl == "vectorized":
        return vectorized_span_mask(cfg, shape, padding_mask, seed, epoch, sample_ids, device)
    return fairseq_span_mask(cfg, shape, padding_mask, seed, epoch, sample_ids).to(device)


def fairseq_span_mask(
    cfg: SpanMaskConfig,
    shape: tuple,
    padding_mask: Optional[torch.Tensor],
    seed: Optional[int],
    epoch: int,
    sample_ids: Optional[torch.Tensor],
) -> torch.Tensor:
    """The mask from fairseq's ``compute_mask_indices`` (a numpy loop over utterances), on the CPU."""
    use_seed = seed is not None and sample_ids is not None
    try:
        mask = _fairseq_mask_indices(cfg, shape, padding_mask, seed, epoch, sample_ids, use_seed)
    except ValueError as err:
        if "entire sequence is masked" in str(err):
            raise SpanMaskError(str(err)) from None
        raise
    return torch.from_numpy(np.asarray(mask))


def _fairseq_mask_indices(cfg, shape, padding_mask, seed, epoch, sample_ids, use_seed) -> np.ndarray:
    """fairseq's ``compute_mask_indices`` called with this config."""
    return compute_mask_indices(
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
        indices=sample_ids.cpu() if use_seed else None,
    )


# --- vectorised implementation ----------------------------------------------------------------

_LOW32 = 0xFFFFFFFF
# Independent random streams drawn per utterance.
_STREAM_ROUNDING = 1  # probabilistic rounding of the number of spans
_STREAM_STARTS = 2  # which frames start a span
_STREAM_EQUALISE = 3  # which masked frames require_same_masks keeps


def _mul_low32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """(x * constant) mod 2**32 for int64 ``x`` in [0, 2**32), without int64 overflow."""
    low, high = constant & 0xFFFF, constant >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & _LOW32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """32-bit integer hash (Wellons' lowbias32) of int64 tensors, elementwise; result in [0, 2**32)."""
    x = x & _LOW32
    x = x ^ (x >> 16)
    x = _mul_low32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul_low32(x, 0x846CA68B)
    return x ^ (x >> 16)


def combine_hash(state: torch.Tensor, value) -> torch.Tensor:
    """Hash of (``state``, ``value``): chains integers of any int64 value into one 32-bit key."""
    value = torch.as_tensor(value, dtype=torch.int64, device=state.device)
    folded = (value & _LOW32) ^ ((value >> 32) & _LOW32)
    return mix32(state ^ mix32(folded ^ 0x9E3779B9))


def utterance_keys(seed: int, epoch: int, sample_ids: torch.Tensor) -> torch.Tensor:
    """One 32-bit key per utterance from (seed, epoch, sample id); every draw for it derives from this."""
    start = torch.zeros_like(sample_ids, dtype=torch.int64)
    return combine_hash(combine_hash(combine_hash(start, seed), epoch), sample_ids.to(torch.int64))


def frame_keys(keys: torch.Tensor, stream: int, num_positions: int) -> torch.Tensor:
    """Distinct int64 sort keys (B, P) for positions 0..P-1 of each utterance, hashed in ``stream``."""
    positions = torch.arange(num_positions, device=keys.device, dtype=torch.int64)
    hashed = combine_hash(combine_hash(keys, stream)[:, None], positions[None, :])
    # position as tie-breaker: keys are distinct, so "the k smallest" is always exactly k.
    return hashed * num_positions + positions


def smallest_k(keys: torch.Tensor, allowed: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Boolean (B, P): the ``k[b]`` smallest keys of row b among ``allowed`` positions (a uniform k-subset)."""
    keys = keys.masked_fill(~allowed, torch.iinfo(torch.int64).max)
    ordered = keys.sort(dim=1).values
    kth = ordered.gather(1, (k - 1).clamp(min=0)[:, None])
    return allowed & (keys <= kth) & (k > 0)[:, None]


def vectorized_span_mask(
    cfg: SpanMaskConfig,
    shape: tuple,
    padding_mask: Optional[torch.Tensor],
    seed: Optional[int],
    epoch: int,
    sample_ids: Optional[torch.Tensor],
    device: torch.device,
) -> torch.Tensor:
    """fairseq's static span masking rule for the whole batch at once, on ``device``.

    Per utterance of ``sz`` real frames (padding is at the end): ``n = max(min_masks,
    floor(mask_prob * sz / L + u))`` spans with u ~ U[0, 1); starts are ``n`` distinct
    frames drawn uniformly from ``[0, sz - L)`` (``[0, n + 1)`` when that range is too
    short, as fairseq does); each span covers L frames, overlaps merge and frames past
    ``sz`` are dropped. ``require_same_masks`` then keeps a uniform subset of each
    utterance's masked frames, as many as the least-masked utterance has.
    """
    batch, frames = int(shape[0]), int(shape[1])
    length = cfg.mask_length
    if padding_mask is not None:
        real = frames - padding_mask.to(device).long().sum(1)
    else:
        real = torch.full((batch,), frames, dtype=torch.int64, device=device)
    if seed is None or sample_ids is None:
        # fairseq draws from an unseeded generator here; use torch's global one.
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
        sample_ids = torch.arange(batch)
    keys = utterance_keys(int(seed), int(epoch), sample_ids.to(device))

    uniform = combine_hash(keys, _STREAM_ROUNDING).double() / 2.0**32
    num_spans = torch.floor(cfg.mask_prob * real.double() / float(length) + uniform).long()
    num_spans = num_spans.clamp(min=cfg.mask_min_masks)
    start_range = torch.where(real - length <= num_spans, num_spans + 1, real - length)
    # num_spans <= max(min_masks, sz) so start_range <= max(min_masks, frames) + 1.
    positions = max(frames, cfg.mask_min_masks) + 1
    allowed = torch.arange(positions, device=device)[None, :] < start_range[:, None]
    starts = smallest_k(frame_keys(keys, _STREAM_STARTS, positions), allowed, num_spans)

    # Frame t is covered when a span starts in (t - L, t]: a windowed count of starts.
    covered = starts.long().cumsum(1)
    covered[:, length:] -= covered[:, :-length].clone()
    mask = (covered[:, :frames] > 0) & (torch.arange(frames, device=device)[None, :] < real[:, None])

    counts = mask.sum(1)
    if bool((counts >= real).any()):
        row = int(torch.nonzero(counts >= real)[0, 0])
        raise SpanMaskError(
            f"the entire sequence is masked: sz={int(real[row])}, index={int(sample_ids[row])} "
            f"(mask_prob={cfg.mask_prob}, mask_length={length}, mask_min_masks={cfg.mask_min_masks})",
            row=row,
        )
    if cfg.require_same_masks:
        target = counts.min().expand(batch)
        mask = smallest_k(frame_keys(keys, _STREAM_EQUALISE, frames), mask, target)
    return mask
