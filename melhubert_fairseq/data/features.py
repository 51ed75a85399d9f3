"""Log-Mel filterbank feature conventions shared by training, tools and extraction.

Features on disk are 10 ms Kaldi fbank frames of shape (frames, dim). The model
may run at a coarser rate by concatenating ``stack`` consecutive frames
(Mel-HuBERT's 20 ms model uses stack=2: an 80-dim frame every 20 ms).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from melhubert_fairseq.atomic_output import atomic_save_npy

#: Kaldi fbank frame shift used by every feature file in this project.
FBANK_FRAME_RATE_HZ = 100


def num_stacked_frames(num_frames, stack: int):
    """Number of model frames for ``num_frames`` 10 ms frames stacked by ``stack`` (int or array)."""
    return -(-num_frames // stack)


def stack_frames(feats: np.ndarray, stack: int) -> np.ndarray:
    """Concatenate each run of ``stack`` consecutive frames: (T, D) -> (ceil(T/stack), stack*D).

    Row i is ``[feats[stack*i], ..., feats[stack*i + stack-1]]``; a short final
    group is zero-padded, exactly as the original Mel-HuBERT 20 ms model did.
    """
    if stack == 1:
        return feats
    num_frames, dim = feats.shape
    padded_len = num_stacked_frames(num_frames, stack) * stack
    if padded_len != num_frames:
        pad = np.zeros((padded_len - num_frames, dim), dtype=feats.dtype)
        feats = np.concatenate([feats, pad], axis=0)
    return feats.reshape(padded_len // stack, stack * dim)


def label_stride(label_rate: float) -> int:
    """10 ms fbank frames per label for labels at ``label_rate`` Hz (100 -> 1, 50 -> 2, 25 -> 4)."""
    stride = FBANK_FRAME_RATE_HZ / label_rate if label_rate > 0 else 0
    if stride < 1 or stride != int(stride):
        raise ValueError(
            f"label rate {label_rate:g} Hz is not {FBANK_FRAME_RATE_HZ} Hz divided by an integer (100, 50, 25, ...)"
        )
    return int(stride)


def expected_label_count(num_frames, stride: int):
    """Labels a ``.km`` line should hold for ``num_frames`` fbank frames at ``stride`` frames per label."""
    return -(-num_frames // stride)


def label_count_tolerance(stride: int) -> int:
    """Allowed |labels - expected|: labels per fbank frame must match exactly; coarser labels may be
    one short or long, the rounding a 20 ms feature dump causes."""
    return 0 if stride == 1 else 1


def subsample_labels(labels: np.ndarray, step: int) -> np.ndarray:
    """Keep every ``step``-th label (the label of each stacked frame's first 10 ms frame)."""
    return labels[::step] if step > 1 else labels


@dataclass(frozen=True)
class MeanStd:
    """Per-dimension corpus statistics used to normalise fbank features."""

    mean: np.ndarray
    std: np.ndarray

    @property
    def dim(self) -> int:
        """Feature dimension the statistics describe."""
        return int(self.mean.shape[0])

    def normalize(self, feats: np.ndarray) -> np.ndarray:
        """Return ``(feats - mean) / std`` as float32."""
        return ((feats - self.mean) / self.std).astype(np.float32, copy=False)

    def to_array(self) -> np.ndarray:
        """The original release's ``mean-std.npy`` layout: (2, dim), row 0 mean, row 1 std."""
        return np.stack([self.mean, self.std]).astype(np.float32)


def validate_mean_std(mean: np.ndarray, std: np.ndarray, source: str) -> MeanStd:
    """Check shapes and values of mean/std read from ``source``; return a MeanStd."""
    mean = np.asarray(mean, dtype=np.float64)
    std = np.asarray(std, dtype=np.float64)
    if mean.ndim != 1 or mean.shape != std.shape or mean.size == 0:
        raise ValueError(
            f"{source}: mean and std must be 1-D vectors of equal length, got {mean.shape} and {std.shape}"
        )
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std))):
        raise ValueError(f"{source}: mean/std contain NaN or Inf")
    bad = np.flatnonzero(std <= 0)
    if bad.size:
        raise ValueError(
            f"{source}: std must be positive, dims {bad.tolist()[:10]} have std <= 0 (zero or negative variance)"
        )
    return MeanStd(mean.astype(np.float32), std.astype(np.float32))


def load_mean_std(path: str) -> MeanStd:
    """Read a ``mean-std.npy`` file of shape (2, dim) (row 0 mean, row 1 std)."""
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"mean/std file not found: {path}") from None
    except ValueError as err:
        raise ValueError(f"{path}: not a readable .npy file ({err})") from None
    if array.ndim != 2 or array.shape[0] != 2:
        raise ValueError(f"{path}: expected shape (2, dim) [mean; std], got {array.shape}")
    return validate_mean_std(array[0], array[1], path)


def save_mean_std(path: str, stats: MeanStd, overwrite: bool = False) -> None:
    """Write ``stats`` atomically in the original (2, dim) ``mean-std.npy`` layout."""
    atomic_save_npy(path, stats.to_array(), overwrite=overwrite)


class MeanStdAccumulator:
    """Streaming float64 sums for corpus mean/std in one pass (mergeable across workers)."""

    def __init__(self, dim: int) -> None:
        self.sum = np.zeros(dim, dtype=np.float64)
        self.sum_sq = np.zeros(dim, dtype=np.float64)
        self.count = 0

    def update(self, feats: np.ndarray) -> None:
        """Add the frames of one (frames, dim) matrix."""
        feats64 = np.asarray(feats, dtype=np.float64)
        self.sum += feats64.sum(axis=0)
        self.sum_sq += np.square(feats64).sum(axis=0)
        self.count += feats64.shape[0]

    def merge(self, other: "MeanStdAccumulator") -> None:
        """Fold another accumulator's sums into this one."""
        self.sum += other.sum
        self.sum_sq += other.sum_sq
        self.count += other.count

    def result(self, source: str = "accumulated statistics") -> MeanStd:
        """Mean and standard deviation of everything seen so far."""
        return mean_std_from_sums(self.sum, self.sum_sq, self.count, source)


def mean_std_from_sums(total: np.ndarray, total_sq: np.ndarray, count: int, source: str) -> MeanStd:
    """mean = s/N, std = sqrt(q/N - mean^2) (the Kaldi ``.mean-var`` convention)."""
    if count <= 0:
        raise ValueError(f"{source}: frame count must be positive, got {count}")
    total = np.asarray(total, dtype=np.float64)
    total_sq = np.asarray(total_sq, dtype=np.float64)
    if total.shape != total_sq.shape:
        raise ValueError(
            f"{source}: sum has {total.shape[0] if total.ndim else 0} dims but sum of squares has "
            f"{total_sq.shape[0] if total_sq.ndim else 0}"
        )
    mean = total / count
    var = total_sq / count - np.square(mean)
    bad = np.flatnonzero(var <= 0)
    if bad.size:
        raise ValueError(f"{source}: zero or negative variance in dims {bad.tolist()[:10]}")
    return validate_mean_std(mean, np.sqrt(var), source)
