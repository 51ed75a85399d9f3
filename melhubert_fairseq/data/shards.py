"""Splitting a manifest into shards, and the file names of per-shard outputs.

Every tool that works on part of a manifest (k-means sampling and labelling,
stage-2 hidden states, the label merge) takes its rows from :func:`shard_range`,
so a shard written by one tool, or by fairseq's ``examples/hubert/simple_kmeans``
scripts, lines up with the rows another tool expects.
"""
from __future__ import annotations

import os
from typing import Tuple

from melhubert_fairseq.errors import InputError


def shard_range(total: int, nshard: int, rank: int) -> Tuple[int, int]:
    """Rows ``[start, end)`` of shard ``rank`` of ``nshard`` over ``total`` manifest rows.

    The split of fairseq's ``simple_kmeans`` (``feature_utils.get_shard_range``):
    ``start = round(total / nshard * rank)`` with Python's float division and
    round-half-to-even, so 5 rows in 2 shards are 2 + 3 (``np.array_split``
    would give 3 + 2) and our shards merge with fairseq's.
    """
    if nshard < 1:
        raise InputError(f"--nshard must be >= 1, got {nshard}")
    if not 0 <= rank < nshard:
        raise InputError(f"--rank must be in [0, {nshard - 1}], got {rank}")
    if nshard > total:
        raise InputError(f"--nshard {nshard} is larger than the number of utterances ({total})")
    start = round(total / nshard * rank)
    end = round(total / nshard * (rank + 1))
    if start >= end:  # fairseq asserts the same; cannot happen with nshard <= total
        raise InputError(f"shard {rank}/{nshard} of {total} utterances is empty ({start}-{end})")
    return start, end


def shard_file_name(split: str, rank: int, nshard: int, suffix: str) -> str:
    """``{split}_{rank}_{nshard}{suffix}`` (fairseq's shard names), or ``{split}{suffix}`` when unsharded."""
    return f"{split}{suffix}" if nshard == 1 else f"{split}_{rank}_{nshard}{suffix}"


def split_name(manifest_path: str) -> str:
    """The split a manifest holds: its file name without ``.tsv`` (``train.tsv`` -> ``train``)."""
    return os.path.splitext(os.path.basename(manifest_path))[0]
