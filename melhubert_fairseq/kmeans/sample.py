"""Sampling the frames k-means is fitted on: random whole utterances of a shard, then at most a cap of frames."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import numpy as np

from melhubert_fairseq.cli import with_progress
from melhubert_fairseq.data.shards import shard_range
from melhubert_fairseq.errors import InputError
from melhubert_fairseq.kmeans.sources import FeatureSource


def choose_sample_rows(
    num_frames: np.ndarray, sample_frac: float, rng: np.random.Generator
) -> np.ndarray:
    """Random whole utterances (sorted positions) holding about ``sample_frac`` of the frames."""
    if not 0 < sample_frac <= 1:
        raise InputError(f"--sample-frac must be in (0, 1], got {sample_frac}")
    if sample_frac >= 1:
        return np.arange(len(num_frames))
    order = rng.permutation(len(num_frames))
    covered = np.cumsum(num_frames[order])
    # Whole utterances keep file reads (and, in stage 2, model forwards) to the sample.
    take = int(np.searchsorted(covered, sample_frac * covered[-1])) + 1
    return np.sort(order[:take])


@dataclass
class FrameSample:
    """Frames sampled for fitting k-means, with where they came from."""

    frames: np.ndarray  # (n, dim) float32
    utterances: int
    source_frames: int  # frames of the sampled utterances before frame subsampling


def sample_frames(
    source: FeatureSource,
    nshard: int = 1,
    rank: int = 0,
    sample_frac: float = 0.1,
    max_frames: Optional[int] = None,
    seed: int = 0,
    progress: bool = True,
) -> FrameSample:
    """Sample frames of shard ``rank``: random whole utterances, then at most ``max_frames`` of their frames."""
    start, end = shard_range(len(source.manifest), nshard, rank)
    rng = np.random.default_rng([seed, rank, nshard])
    rows = start + choose_sample_rows(source.manifest.num_frames[start:end], sample_frac, rng)
    expected = np.asarray([source.expected_frames(int(r)) for r in rows], dtype=np.int64)
    expected_total = int(expected.sum())
    keep = None
    if max_frames and expected_total > max_frames:
        # Choose the kept frames up front (exactly max_frames, spread over every sampled
        # utterance) so memory stays at max_frames however large the sample is.
        keep = np.sort(rng.choice(expected_total, max_frames, replace=False))
        utterance_starts = np.concatenate([[0], np.cumsum(expected)])
        keep_bounds = np.searchsorted(keep, utterance_starts)
    kept: List[np.ndarray] = []
    dim = None
    seen = 0
    for position, (row, feats) in enumerate(with_progress(
        source.iter_rows(rows), total=len(rows), desc=f"sample shard {rank}/{nshard}",
        unit="utt", disable=not progress,
    )):
        if dim is None:
            dim = feats.shape[1]
        elif feats.shape[1] != dim:
            raise InputError(
                f"{source.where(row)}: feature dim {feats.shape[1]} differs from the {dim} of earlier utterances"
            )
        seen += feats.shape[0]  # sources check each utterance has its expected frame count
        if keep is not None:
            lo, hi = keep_bounds[position], keep_bounds[position + 1]
            feats = feats[keep[lo:hi] - utterance_starts[position]]
        kept.append(feats)
    frames = np.concatenate(kept, axis=0)
    return FrameSample(np.ascontiguousarray(frames), len(rows), seen)

