"""Log-Mel filterbank feature conventions shared by training, tools and extraction.

Features on disk are 10 ms Kaldi fbank frames of shape (frames, dim). The model
may run at a coarser rate by concatenating ``stack`` consecutive frames
(Mel-HuBERT's 20 ms model uses stack=2: an 80-dim frame every 20 ms).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional, Tuple

import numpy as np

from melhubert_fairseq.atomic_output import atomic_save_npy
from melhubert_fairseq.disk_full import writing
from melhubert_fairseq.errors import InputError, check_regular_file
from melhubert_fairseq.file_formats import NPY_MAGIC

# The fbank every feature file of this project holds (computed by melhubert_fairseq.data.fbank).
#: Mel bins of one fbank frame, in every feature file of this project (the original's num_mel_bins=40).
FBANK_NUM_MEL_BINS = 40
#: fbank frames per second (a 10 ms Kaldi frame shift), in every feature file of this project.
FBANK_FRAME_RATE_HZ = 100
#: Sample rate every fbank feature in this project is computed at.
FBANK_SAMPLE_RATE = 16000
#: 25 ms analysis window at 16 kHz.
FBANK_WINDOW_SAMPLES = 400
#: Frame shift at 16 kHz: 160 samples = 10 ms.
FBANK_SHIFT_SAMPLES = FBANK_SAMPLE_RATE // FBANK_FRAME_RATE_HZ
#: torchaudio.load returns int16 audio divided by 2**15; the original multiplied it back.
INT16_SCALE = float(2**15)
#: dtypes a feature matrix may have on disk (read as float32).
FEATURE_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))
_PICKLE_PROTOCOL_2_PLUS = b"\x80"


# --------------------------------------------------------------------------- .npy files
def open_npy(path: str, where: str = "", what: str = ".npy file") -> np.ndarray:
    """Memory-map a plain ``.npy`` array, read-only: the one way this project opens ``.npy`` input.

    Refuses, with a message naming ``where`` and ``path``: anything but a
    regular file (a FIFO would block the reader), pickles and pickled object
    arrays (never unpickled), files that are not ``.npy``, and files shorter
    than their header says (truncated copies). Only the header is read here.
    """
    prefix = f"{where}: " if where else ""
    check_regular_file(path, where, what)
    try:
        with open(path, "rb") as handle:
            start = handle.read(len(NPY_MAGIC))
            if not start.startswith(NPY_MAGIC):
                if start.startswith(_PICKLE_PROTOCOL_2_PLUS):
                    raise InputError(f"{prefix}{path} is not a plain .npy array but a Python pickle; refusing to unpickle it")
                raise InputError(f"{prefix}cannot read {path} (not a .npy file: it does not start with the .npy magic)")
            handle.seek(0)
            version = np.lib.format.read_magic(handle)
            # Version 3.0 only differs from 2.0 in allowing utf-8 field names (structured dtypes).
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran_order, dtype = read_header(handle)
            data_offset = handle.tell()
    except InputError:
        raise
    except (ValueError, EOFError, OSError) as err:
        raise InputError(f"{prefix}cannot read {path} (truncated or not a .npy file: {err})") from None
    if dtype.hasobject:
        raise InputError(
            f"{prefix}{path} is not a plain .npy array: it holds pickled Python objects (dtype {dtype}); "
            "refusing to unpickle it"
        )
    needed = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    available = os.path.getsize(path) - data_offset
    if available < needed:
        raise InputError(
            f"{prefix}cannot read {path} (truncated: its header describes a {dtype} array of shape {shape}, "
            f"{needed} bytes, but the file holds {max(available, 0)})"
        )
    if needed == 0:
        return np.zeros(shape, dtype=dtype)  # mmap cannot map zero bytes
    return np.memmap(path, dtype=dtype, mode="r", offset=data_offset, shape=shape, order="F" if fortran_order else "C")


def check_feature_matrix(
    feats: np.ndarray,
    where: str,
    subject: str,
    expected_dim: Optional[int] = None,
    expected_frames: Optional[int] = None,
    dim_name: str = "",
    frames_expected: str = "the manifest says {expected}",
) -> None:
    """The one feature-matrix rule, from shape and dtype only: float32/float16, 2-D (frames, dim),
    ``expected_dim`` columns, at least one frame, ``expected_frames`` rows (the manifest's count).

    ``subject`` names the matrix (its file) after ``where`` (``manifest:line (utt)``);
    ``dim_name`` says where ``expected_dim`` comes from (e.g. ``task.feat_dim``),
    ``frames_expected`` where ``expected_frames`` does.
    Finite values are :func:`check_finite_frames`' job (it reads the data).
    """
    shape, dtype = feats.shape, feats.dtype
    if dtype.hasobject:
        raise InputError(f"{where}: {subject} holds Python objects (dtype {dtype}), expected float32 or float16 features")
    if dtype not in FEATURE_DTYPES:
        raise InputError(f"{where}: {subject} has dtype {dtype}, expected float32 or float16 features")
    if len(shape) != 2 or (expected_dim is not None and shape[1] != expected_dim):
        expected = f"(frames, {expected_dim})" if expected_dim is not None else "a 2-D (frames, dim) matrix"
        hint = f" ({dim_name})" if dim_name and expected_dim is not None else ""
        raise InputError(f"{where}: {subject} has shape {shape}, expected {expected}{hint}")
    if shape[0] == 0:
        raise InputError(f"{where}: {subject} has no frames (shape {shape})")
    if expected_frames is not None and shape[0] != expected_frames:
        expected = frames_expected.format(expected=expected_frames)
        raise InputError(f"{where}: {subject} has {shape[0]} frames but {expected}")


def check_finite_frames(frames: np.ndarray, where: str, subject: str, first_frame: int = 0) -> None:
    """Refuse NaN/Inf, naming the first bad frame (``first_frame`` = index of ``frames[0]`` in the file)."""
    finite = np.isfinite(frames)
    if not finite.all():
        bad_rows = np.flatnonzero(~finite.reshape(len(frames), -1).all(axis=1))
        raise InputError(
            f"{where}: {subject} has {bad_rows.size} frame(s) with NaN/Inf (first at frame {int(bad_rows[0]) + first_frame})"
        )


def open_feature_file(
    path: str,
    where: str,
    expected_dim: Optional[int] = None,
    expected_frames: Optional[int] = None,
    dim_name: str = "",
) -> np.ndarray:
    """Memory-map a feature ``.npy`` after :func:`open_npy` and :func:`check_feature_matrix`; no data is read."""
    feats = open_npy(path, where, what="feature file")
    check_feature_matrix(feats, where, path, expected_dim, expected_frames, dim_name)
    return feats


def read_feature_file(
    path: str,
    where: str,
    expected_dim: Optional[int] = None,
    expected_frames: Optional[int] = None,
    dim_name: str = "",
) -> np.ndarray:
    """A whole feature file as a checked (finite) C-contiguous float32 matrix."""
    feats = np.ascontiguousarray(open_feature_file(path, where, expected_dim, expected_frames, dim_name), dtype=np.float32)
    check_finite_frames(feats, where, path)
    return feats


def check_feature_array(
    feats: np.ndarray,
    where: str,
    subject: str,
    expected_dim: Optional[int] = None,
    expected_frames: Optional[int] = None,
    dim_name: str = "",
    frames_expected: str = "the manifest says {expected}",
) -> np.ndarray:
    """An in-memory matrix (decoded ark, model output) checked like a feature file; returned as float32."""
    feats = np.asarray(feats)
    check_feature_matrix(feats, where, subject, expected_dim, expected_frames, dim_name, frames_expected)
    feats = np.ascontiguousarray(feats, dtype=np.float32)
    check_finite_frames(feats, where, subject)
    return feats


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


#: Smallest per-dimension std accepted in a mean/std. Normalising divides by it: below 1e-5 the
#: float32 rounding noise of log-Mel values (~1e-6) becomes features of order 0.1 and more, and a
#: std of 1e-40 writes inf. Real fbank statistics have std of order 1 in every dimension.
MIN_STD = 1e-5


def check_mean_std(mean: np.ndarray, std: np.ndarray, source: str) -> Tuple[np.ndarray, np.ndarray]:
    """The one check of corpus statistics (1-D, equal length, finite, std >= MIN_STD); returns float32 copies."""
    mean = np.asarray(mean, dtype=np.float64)
    std = np.asarray(std, dtype=np.float64)
    if mean.ndim != 1 or mean.shape != std.shape or mean.size == 0:
        raise InputError(
            f"{source}: mean and std must be 1-D vectors of equal length, got {mean.shape} and {std.shape}"
        )
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std))):
        raise InputError(f"{source}: mean/std contain NaN or Inf")
    bad = np.flatnonzero(~(std >= MIN_STD))
    if bad.size:
        shown = ", ".join(f"{int(d)}: {std[d]:.3g}" for d in bad[:10])
        raise InputError(
            f"{source}: std must be positive and at least {MIN_STD:g} (normalising divides by it), "
            f"{bad.size} dims have less (dim: std {shown}); a constant or near-constant feature dimension"
        )
    return mean.astype(np.float32), std.astype(np.float32)


@dataclass(frozen=True)
class MeanStd:
    """Per-dimension corpus statistics used to normalise fbank features (checked on construction)."""

    mean: np.ndarray
    std: np.ndarray
    #: Where the statistics came from, for error messages.
    source: str = field(default="mean/std", compare=False, repr=False)

    def __post_init__(self) -> None:
        mean, std = check_mean_std(self.mean, self.std, self.source)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

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
    """Mean/std read from ``source``, checked by :func:`check_mean_std`."""
    return MeanStd(mean, std, source)


def load_mean_std(path: str) -> MeanStd:
    """Read a ``mean-std.npy`` file of shape (2, dim) (row 0 mean, row 1 std)."""
    array = np.array(open_npy(path, path, what="mean/std file"))
    if array.ndim != 2 or array.shape[0] != 2:
        raise InputError(f"{path}: expected shape (2, dim) [mean; std], got {array.shape}")
    if array.dtype.kind != "f":
        raise InputError(f"{path}: has dtype {array.dtype}, expected float mean/std")
    return validate_mean_std(array[0], array[1], path)


def save_mean_std(path: str, stats: MeanStd, overwrite: bool = False) -> None:
    """Write ``stats`` atomically in the original (2, dim) ``mean-std.npy`` layout."""
    atomic_save_npy(path, stats.to_array(), overwrite=overwrite)


#: File name of the statistics a tool writes next to the manifests it normalised (the original's name).
MEAN_STD_NAME = "mean-std.npy"


def raw_stats_name(split: str) -> str:
    """File name of the statistics of a raw (``--no-normalize``) split: ``{split}.mean-std.npy``, so raw
    train and valid splits share a folder and no ``mean-std.npy`` claims they are normalised."""
    return f"{split}.{MEAN_STD_NAME}"


def normalization_record_path(manifest_path: str) -> str:
    """The record next to a feature manifest: ``{split}.tsv`` -> ``{split}.features.json``."""
    stem = manifest_path[: -len(".tsv")] if manifest_path.endswith(".tsv") else manifest_path
    return stem + ".features.json"


@dataclass(frozen=True)
class FeatureNormalization:
    """Whether the features a manifest lists are normalised on disk, and with which statistics.

    Written by the tools that write features (``melhubert-wav-to-fbank``,
    ``melhubert-import-kaldi-features``) as ``{split}.features.json`` next to
    ``{split}.tsv``, and checked by training: normalised features must not be
    normalised again (``task.mean_std_path``), raw ones must be. ``mean_std``
    is the statistics file: the one the features were normalised with, or for
    raw features their own (``{split}.mean-std.npy``), to pass as
    ``task.mean_std_path``. Folders written before this record existed have
    none (:meth:`read` returns None).
    """

    normalized: bool
    mean_std: Optional[str]  # absolute path
    written_by: str

    def write(self, path: str, manifest_path: str) -> None:
        """Write the record to ``path`` (a staged file), naming ``mean_std`` relative to the folder of the
        manifest it will sit next to (``manifest_path``, final name) when it lies below it."""
        folder = os.path.dirname(os.path.abspath(manifest_path))
        mean_std = self.mean_std
        if mean_std is not None:
            mean_std = os.path.abspath(mean_std)
            if os.path.commonpath([folder, mean_std]) == folder:
                mean_std = os.path.relpath(mean_std, folder)
        with writing(path, "w") as handle:
            json.dump({"normalized": self.normalized, "mean_std": mean_std, "written_by": self.written_by}, handle, indent=2)
            handle.write("\n")

    @classmethod
    def read(cls, manifest_path: str) -> Optional["FeatureNormalization"]:
        """The record next to ``manifest_path``, or None when there is none (features written before it existed)."""
        path = normalization_record_path(manifest_path)
        if not os.path.lexists(path):
            return None
        check_regular_file(path, what="normalisation record")
        try:
            with open(path, "r", encoding="utf-8") as handle:
                record = json.load(handle)
            normalized, mean_std = record["normalized"], record["mean_std"]
            if not isinstance(normalized, bool) or not (mean_std is None or isinstance(mean_std, str)):
                raise ValueError("'normalized' must be true or false and 'mean_std' a path or null")
        except (ValueError, KeyError, TypeError) as err:
            raise InputError(f"{path}: not a feature normalisation record ({err!r}); rewrite the features with "
                             "the tool that made them") from None
        if mean_std is not None:
            mean_std = os.path.join(os.path.dirname(os.path.abspath(manifest_path)), mean_std)
        return cls(normalized, mean_std, str(record.get("written_by", "")))


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
        raise InputError(f"{source}: frame count must be positive, got {count}")
    total = np.asarray(total, dtype=np.float64)
    total_sq = np.asarray(total_sq, dtype=np.float64)
    if total.shape != total_sq.shape:
        raise InputError(
            f"{source}: sum has {total.shape[0] if total.ndim else 0} dims but sum of squares has "
            f"{total_sq.shape[0] if total_sq.ndim else 0}"
        )
    mean = total / count
    # Rounding can make the variance of a constant dimension slightly negative: the std
    # floor in check_mean_std reports it with the other too-small dims.
    var = np.maximum(total_sq / count - np.square(mean), 0.0)
    return validate_mean_std(mean, np.sqrt(var), source)
