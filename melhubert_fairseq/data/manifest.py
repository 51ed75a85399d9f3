"""fairseq-HuBERT style tsv manifests: of fbank ``.npy`` files, and of the audio they are made from.

``{split}.tsv``: first line the root directory, then one
``relative/path.npy<TAB>num_frames`` row per utterance (num_frames counted in
10 ms fbank frames). An audio manifest (fairseq's wav2vec layout, what
``melhubert-wav-to-fbank`` reads, :mod:`melhubert_fairseq.data.audio_manifest`)
has the same shape with ``relative/path.flac<TAB>num_samples`` rows. The
labels beside a manifest are :mod:`melhubert_fairseq.data.labels`' job.

The root line of either kind is read the same way: an absolute root as it is,
a relative one relative to the folder holding the manifest (``.`` is that
folder), never to the working directory, so a manifest means the same files
from wherever a tool or training runs (hydra changes directory). fairseq's own
``wav2vec_manifest.py`` writes absolute roots, which every reader agrees on;
fairseq's ``FileAudioDataset`` would read a relative root against the working
directory, so audio manifests meant for fairseq's fine-tuning get an absolute
one (:mod:`melhubert_fairseq.finetuning` writes them so).

Each row's file extension tells the two kinds apart, and a manifest of the
wrong kind is refused at its first row with the tool to run instead
(:func:`check_manifest_kind`).

A LibriSpeech-960 manifest has 281k rows, so the in-memory index is kept
compact: paths live in one bytes buffer with offsets.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Tuple

import numpy as np

from melhubert_fairseq.atomic_output import atomic_output
from melhubert_fairseq.output_guards import safe_relative_path
from melhubert_fairseq.errors import InputError, check_regular_file

#: The two kinds of tsv manifest: fbank features (``num_frames``) and audio (``num_samples``).
FEATURES, AUDIO = "features", "audio"
#: The count column of each kind.
COUNT_COLUMN = {FEATURES: "num_frames", AUDIO: "num_samples"}
#: What a feature manifest lists.
FEATURE_EXTENSION = ".npy"
#: Audio files an audio manifest may list (formats soundfile reads); only used to recognise one.
AUDIO_MANIFEST_EXTENSIONS = (".wav", ".flac", ".ogg", ".opus", ".mp3", ".sph", ".aif", ".aiff")
#: What each kind of manifest is for when it is given where the other is expected.
DEFAULT_ADVICE = {
    AUDIO: "run melhubert-wav-to-fbank first: it writes the fbank features and their manifest",
    FEATURES: "it is what melhubert-wav-to-fbank writes: give it to the k-means tools, feature extraction "
    "(--manifest) or training as it is",
}


@dataclass
class FeatureManifest:
    """The rows of one ``{split}.tsv``: root dir, packed relative paths and frame counts."""

    path: str
    root: str  # absolute, resolved from the root line (a relative one against the manifest's folder)
    path_bytes: np.ndarray  # uint8, all relative paths utf-8 encoded back to back
    path_offsets: np.ndarray  # int64, len N+1
    num_frames: np.ndarray  # int64, frames per utterance (10 ms)
    line_numbers: np.ndarray  # int32, 1-based line of each row in the tsv

    def __len__(self) -> int:
        return len(self.num_frames)

    def relative_path(self, index: int) -> str:
        """The manifest's path column for row ``index``."""
        start, end = self.path_offsets[index], self.path_offsets[index + 1]
        return self.path_bytes[start:end].tobytes().decode("utf-8")

    def full_path(self, index: int) -> str:
        """Absolute (root-joined) path of row ``index``'s feature file."""
        return os.path.join(self.root, self.relative_path(index))

    def utterance_id(self, index: int) -> str:
        """Utterance id of row ``index``: the file name without directory and extension."""
        return os.path.splitext(os.path.basename(self.relative_path(index)))[0]

    def describe(self, index: int) -> str:
        """``manifest:line (utt_id)`` for error messages."""
        return f"{self.path}:{self.line_numbers[index]} ({self.utterance_id(index)})"

    def select(self, keep: np.ndarray) -> "FeatureManifest":
        """A manifest holding only rows ``keep`` (sorted indices)."""
        lengths = np.diff(self.path_offsets)[keep]
        offsets = np.zeros(len(keep) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        parts = [self.path_bytes[self.path_offsets[i] : self.path_offsets[i + 1]] for i in keep]
        path_bytes = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint8)
        return FeatureManifest(
            self.path, self.root, path_bytes, offsets, self.num_frames[keep], self.line_numbers[keep]
        )


def resolve_root(manifest_path: str, root: str) -> str:
    """The absolute root directory a manifest's root line names: a relative one is relative to the
    manifest's folder (both kinds of manifest)."""
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(manifest_path)), root))


def check_manifest_kind(rel_path: str, count: int, expected: str, where: str, advice: Optional[str] = None) -> None:
    """Refuse a row showing the manifest is of the other kind than ``expected`` (an audio file in a feature
    manifest, a ``.npy`` in an audio manifest); ``advice`` says what to do instead (default: which tool)."""
    extension = os.path.splitext(rel_path)[1].lower()
    if expected == FEATURES and extension in AUDIO_MANIFEST_EXTENSIONS:
        found, what = AUDIO, f"{rel_path} is audio and {count} its num_samples"
    elif expected == AUDIO and extension == FEATURE_EXTENSION:
        found, what = FEATURES, f"{rel_path} is a fbank .npy file and {count} its num_frames"
    else:
        return
    raise InputError(f"{where}: this is {'an audio' if found == AUDIO else 'a feature'} manifest ({what}): "
                     f"{advice or DEFAULT_ADVICE[found]}")


def iter_tsv_manifest(
    path: str, kind: str = FEATURES, other_kind_advice: Optional[str] = None
) -> Iterator[Tuple[str, int, str, int]]:
    """Yield ``(root, line_no, relative_path, count)`` for each row of a fairseq tsv manifest of ``kind``.

    The format of both fbank (:data:`FEATURES`, ``num_frames``) and audio (:data:`AUDIO`,
    ``num_samples``) manifests: a root line, then ``relative/path<TAB>count`` rows. ``root`` is the
    resolved absolute root (:func:`resolve_root`); a row that is absolute or leaves the root (``..``) is
    refused, for every reader alike (tools write outputs named after rows, which must stay below their folder). Errors name the file and line; a manifest of the
    other kind is refused with ``other_kind_advice`` (default: the tool to run).
    """
    count_name = COUNT_COLUMN[kind]
    check_regular_file(path, what="manifest")
    with open(path, "r", encoding="utf-8") as handle:
        root_line = handle.readline().rstrip("\n")
        if not root_line:
            raise InputError(f"{path}: empty manifest (the first line must be the root directory)")
        root = resolve_root(path, root_line)
        for line_no, line in enumerate(handle, start=2):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) != 2:
                raise InputError(f"{path}:{line_no}: expected 'relative/path<TAB>{count_name}', got {line!r}")
            try:
                count = int(fields[1])
            except ValueError:
                raise InputError(f"{path}:{line_no}: {count_name} {fields[1]!r} is not an integer") from None
            where = f"{path}:{line_no} ({os.path.splitext(os.path.basename(fields[0]))[0]})"
            if ".." in fields[0] or fields[0].startswith(os.sep) or not fields[0].strip("./"):
                safe_relative_path(fields[0], where)  # the slow, exact check only for rows that may fail it
            check_manifest_kind(fields[0], count, kind, where, other_kind_advice)
            if count <= 0:
                raise InputError(f"{path}:{line_no}: {count_name} must be positive, got {count}")
            yield root, line_no, fields[0], count


def read_manifest(path: str, audio_manifest_advice: Optional[str] = None) -> FeatureManifest:
    """Parse ``path`` (a ``{split}.tsv`` of fbank features); errors name the file and line, and an audio
    manifest is refused with ``audio_manifest_advice`` (default: run melhubert-wav-to-fbank first)."""
    encoded_paths = bytearray()
    offsets = [0]
    frames = []
    lines = []
    root = None
    for root, line_no, rel_path, count in iter_tsv_manifest(path, FEATURES, audio_manifest_advice):
        encoded_paths += rel_path.encode("utf-8")
        offsets.append(len(encoded_paths))
        frames.append(count)
        lines.append(line_no)
    if not frames:
        raise InputError(f"{path}: empty manifest (no utterances after the root line)")
    return FeatureManifest(
        path=path,
        root=root,
        path_bytes=np.frombuffer(bytes(encoded_paths), dtype=np.uint8),
        path_offsets=np.asarray(offsets, dtype=np.int64),
        num_frames=np.asarray(frames, dtype=np.int64),
        line_numbers=np.asarray(lines, dtype=np.int32),
    )


def write_tsv_manifest(
    path: str, root: str, rows: Iterable[Tuple[str, int]], kind: str = FEATURES, overwrite: bool = False
) -> int:
    """Atomically write a manifest of ``kind``: the ``root`` line, then ``(relative_path, count)`` rows
    (``num_frames`` or ``num_samples``); return the row count. The one writer of both kinds."""
    count = 0
    with atomic_output(path, overwrite=overwrite) as handle:
        handle.write(f"{root}\n")
        for rel_path, num in rows:
            if "\t" in rel_path or "\n" in rel_path:
                raise InputError(f"{path}: path {rel_path!r} contains a tab or newline")
            handle.write(f"{rel_path}\t{int(num)}\n")
            count += 1
    if count == 0:
        raise InputError(f"{path}: refusing to write an empty manifest")
    return count


def write_manifest(
    path: str, root: str, rows: Iterable[Tuple[str, int]], overwrite: bool = False
) -> int:
    """Atomically write a feature manifest of ``(relative_path, num_frames)`` rows; return the row count."""
    return write_tsv_manifest(path, root, rows, FEATURES, overwrite)
