"""fairseq-HuBERT style manifests of fbank ``.npy`` files and ``.km`` label files, and the audio manifests
they are made from.

``{split}.tsv``: first line the root directory, then one
``relative/path.npy<TAB>num_frames`` row per utterance (num_frames counted in
10 ms fbank frames). ``{split}.km``: one line per manifest row, space-separated
integer cluster ids. An audio manifest (fairseq's wav2vec layout, what
``melhubert-wav-to-fbank`` reads) has the same shape with
``relative/path.flac<TAB>num_samples`` rows.

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
compact: paths live in one bytes buffer with offsets, and labels are never held
in memory, only the byte offset of each line.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Tuple

import numpy as np

from melhubert_fairseq.atomic_output import atomic_output
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
    resolved absolute root (:func:`resolve_root`). Errors name the file and line; a manifest of the
    other kind is refused with ``other_kind_advice`` (default: the tool to run).
    """
    count_name = COUNT_COLUMN[kind]
    check_regular_file(path, what="manifest")
    with open(path, "r", encoding="utf-8") as handle:
        root_line = handle.readline().rstrip("\n")
        if not root_line:
            raise ValueError(f"{path}: empty manifest (the first line must be the root directory)")
        root = resolve_root(path, root_line)
        for line_no, line in enumerate(handle, start=2):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) != 2:
                raise ValueError(f"{path}:{line_no}: expected 'relative/path<TAB>{count_name}', got {line!r}")
            try:
                count = int(fields[1])
            except ValueError:
                raise ValueError(f"{path}:{line_no}: {count_name} {fields[1]!r} is not an integer") from None
            where = f"{path}:{line_no} ({os.path.splitext(os.path.basename(fields[0]))[0]})"
            check_manifest_kind(fields[0], count, kind, where, other_kind_advice)
            if count <= 0:
                raise ValueError(f"{path}:{line_no}: {count_name} must be positive, got {count}")
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
        raise ValueError(f"{path}: empty manifest (no utterances after the root line)")
    return FeatureManifest(
        path=path,
        root=root,
        path_bytes=np.frombuffer(bytes(encoded_paths), dtype=np.uint8),
        path_offsets=np.asarray(offsets, dtype=np.int64),
        num_frames=np.asarray(frames, dtype=np.int64),
        line_numbers=np.asarray(lines, dtype=np.int32),
    )


def write_manifest(
    path: str, root: str, rows: Iterable[Tuple[str, int]], overwrite: bool = False
) -> int:
    """Atomically write a manifest of ``(relative_path, num_frames)`` rows; return the row count."""
    count = 0
    with atomic_output(path, overwrite=overwrite) as handle:
        handle.write(f"{root}\n")
        for rel_path, num_frames in rows:
            if "\t" in rel_path or "\n" in rel_path:
                raise ValueError(f"{path}: path {rel_path!r} contains a tab or newline")
            handle.write(f"{rel_path}\t{int(num_frames)}\n")
            count += 1
    if count == 0:
        raise ValueError(f"{path}: refusing to write an empty manifest")
    return count


@dataclass
class LabelIndex:
    """Byte offset and token count of every line of a ``.km`` file (labels stay on disk)."""

    path: str
    offsets: np.ndarray  # int64, start byte of each line
    counts: np.ndarray  # int64, number of labels on each line

    def __len__(self) -> int:
        return len(self.offsets)

    def read(self, index: int) -> np.ndarray:
        """Labels of line ``index`` as int64."""
        with open(self.path, "rb") as handle:
            handle.seek(int(self.offsets[index]))
            line = handle.readline()
        return parse_label_line(line, f"{self.path}:{index + 1}")


#: Bytes a label line may hold for numpy's C parser to read all of it (digits and whitespace).
_PLAIN_LABEL_BYTES = b"0123456789 \t\r\n\x0b\x0c"


def parse_label_line(line: bytes, where: str) -> np.ndarray:
    """Parse one line of space-separated integer labels into int64; ``where`` names it in errors."""
    # numpy's C parser is ~4x faster than int() per token (25 vs 95 us for a 1500-label
    # line). It stops silently (with a warning) at a token it cannot read, so it only gets
    # lines of digits and whitespace, which it reads to the end; anything else (a sign, a
    # typo) takes the slow path, which names the bad token. No warning filter is touched:
    # that state is process-wide, and fairseq's prefetch thread runs this during training.
    if not line.strip():
        return np.zeros(0, dtype=np.int64)  # fromstring would read "\n" as [0]
    if not line.translate(None, _PLAIN_LABEL_BYTES):
        return np.fromstring(line, dtype=np.int64, sep=" ")
    text = line.decode("ascii", errors="replace").split()
    try:
        return np.asarray([int(tok) for tok in text], dtype=np.int64)
    except ValueError:
        bad = next(tok for tok in text if not tok.lstrip("-").isdigit())
        raise ValueError(f"{where}: label {bad!r} is not an integer") from None


def index_label_file(path: str, chunk_bytes: int = 1 << 22) -> LabelIndex:
    """Scan a ``.km`` file once for line offsets and per-line label counts.

    Works in chunks with numpy so that LibriSpeech-960 (1.4 GB of text) is
    indexed without ever holding its labels in memory.
    """
    check_regular_file(path, what="label file")
    offsets = [np.zeros(1, dtype=np.int64)]
    counts = []
    base = 0
    carry_tokens = 0  # tokens of the line that continues into the next chunk
    carry_in_token = False
    last_byte_newline = True
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(chunk_bytes)
            if not chunk:
                break
            data = np.frombuffer(chunk, dtype=np.uint8)
            is_space = data <= 0x20  # space, tab, CR, LF (labels are ASCII digits)
            prev_space = np.empty_like(is_space)
            prev_space[0] = not carry_in_token
            prev_space[1:] = is_space[:-1]
            token_starts = np.cumsum(~is_space & prev_space)
            newlines = np.flatnonzero(data == 0x0A)
            starts_before = np.concatenate([[0], token_starts[newlines]])
            per_line = np.diff(starts_before)
            if len(newlines):
                per_line[0] += carry_tokens
                counts.append(per_line)
                offsets.append(base + newlines.astype(np.int64) + 1)
                carry_tokens = int(token_starts[-1] - token_starts[newlines[-1]])
            else:
                carry_tokens += int(token_starts[-1])
            carry_in_token = not bool(is_space[-1])
            last_byte_newline = data[-1] == 0x0A
            base += len(chunk)
    all_offsets = np.concatenate(offsets)
    if not last_byte_newline:  # final line without trailing newline
        counts.append(np.asarray([carry_tokens], dtype=np.int64))
    else:
        all_offsets = all_offsets[:-1]
    all_counts = np.concatenate(counts).astype(np.int64) if counts else np.zeros(0, np.int64)
    return LabelIndex(path=path, offsets=all_offsets.astype(np.int64), counts=all_counts)


def load_km_labels(path: str) -> Iterator[np.ndarray]:
    """Yield the labels of each line of a ``.km`` file in order."""
    with open(path, "rb") as handle:
        for line_no, line in enumerate(handle, start=1):
            yield parse_label_line(line, f"{path}:{line_no}")


def write_km(path: str, labels: Iterable[np.ndarray], overwrite: bool = False) -> int:
    """Atomically write one line of space-separated labels per item; return the line count."""
    count = 0
    with atomic_output(path, overwrite=overwrite) as handle:
        for row in labels:
            handle.write(" ".join(map(str, np.asarray(row).tolist())) + "\n")
            count += 1
    return count


def read_dictionary_size(path: str) -> Optional[int]:
    """Number of symbols in a fairseq ``dict.km.txt`` (``symbol count`` per line)."""
    if not os.path.isfile(path):
        return None
    with open(path, "r", encoding="utf-8") as handle:
        return sum(1 for line in handle if line.strip())


def write_dictionary(path: str, num_classes: int, overwrite: bool = False) -> None:
    """Write ``dict.km.txt`` listing cluster ids 0..num_classes-1 (fairseq's dict format)."""
    with atomic_output(path, overwrite=overwrite) as handle:
        for cluster in range(num_classes):
            handle.write(f"{cluster} 1\n")
