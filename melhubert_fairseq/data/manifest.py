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
import sys
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from melhubert_fairseq.atomic_output import atomic_output
from melhubert_fairseq.disk_full import writing
from melhubert_fairseq.output_guards import check_writable, refuse_replacing_inputs, safe_relative_path
from melhubert_fairseq.staged_outputs import StagedOutputs
from melhubert_fairseq.cli import format_ids, with_progress
from melhubert_fairseq.data.features import FBANK_FRAME_RATE_HZ, expected_label_count, label_count_tolerance
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
            if ".." in fields[0] or fields[0].startswith(os.sep) or not fields[0].strip("./"):
                safe_relative_path(fields[0], where)  # the slow, exact check only for rows that may fail it
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


class LabelLineFormatter:
    """The one writer of ``.km`` lines: space-separated non-negative integer labels, newline-ended (fairseq's
    ``dump_km_label.py`` layout, byte for byte).

    Labels are looked up in a table of their decimal strings, ~3x faster than ``map(str)``; the table
    starts at ``num_classes`` entries and grows to the largest label seen.
    """

    def __init__(self, num_classes: int = 0) -> None:
        self.table = [str(i) for i in range(num_classes)]

    def __call__(self, labels: np.ndarray) -> str:
        """One ``.km`` line (with newline) for the 1-D integer ``labels``."""
        labels = np.asarray(labels)
        table = self.table
        # One pass over the labels: seen as unsigned, a negative label (which would silently index the
        # table from its end) is larger than any table, so it takes the same branch as a new label.
        unsigned = labels.view(f"u{labels.itemsize}") if labels.dtype.kind == "i" else labels
        if labels.size and int(unsigned.max()) >= len(table):
            if labels.min() < 0:
                raise ValueError(f"negative label {int(labels.min())} cannot be written to a .km line")
            table.extend(str(i) for i in range(len(table), int(labels.max()) + 1))
        return " ".join([table[i] for i in labels.tolist()]) + "\n"


def write_km(path: str, labels: Iterable[np.ndarray], overwrite: bool = False, num_classes: int = 0) -> int:
    """Atomically write one ``.km`` line per item of ``labels``; return the line count."""
    format_line = LabelLineFormatter(num_classes)
    count = 0
    with atomic_output(path, overwrite=overwrite) as handle:
        for row in labels:
            handle.write(format_line(row))
            count += 1
    return count


def read_dictionary_size(path: str) -> Optional[int]:
    """Number of symbols in a fairseq ``dict.km.txt`` (``symbol count`` per line)."""
    if not os.path.isfile(path):
        return None
    with open(path, "r", encoding="utf-8") as handle:
        return sum(1 for line in handle if line.strip())


def dictionary_needs_writing(path: str, num_classes: int, overwrite: bool, k_source: str) -> bool:
    """Whether ``dict.km.txt`` must be (re)written for ``num_classes``: one listing the same K is kept as
    is; one for another K is an error unless ``overwrite`` (``k_source``, e.g. ``"--num-classes is"``,
    says in it where K came from)."""
    existing = read_dictionary_size(path)
    if existing == num_classes:
        return False
    if existing is not None and not overwrite:
        raise FileExistsError(
            f"{path} lists {existing} clusters but {k_source} {num_classes}; pass --overwrite to replace it"
        )
    return True


def write_dictionary(path: str, num_classes: int, overwrite: bool = False) -> None:
    """Write ``dict.km.txt`` listing cluster ids 0..num_classes-1 (fairseq's dict format)."""
    with atomic_output(path, overwrite=overwrite) as handle:
        for cluster in range(num_classes):
            handle.write(f"{cluster} 1\n")


# Labels made elsewhere (the original release's Kaldi arks, a folder of label files) matched to a
# manifest's utterances, checked against its frame counts, and written as {split}.km beside it.


def check_unique_ids(ids: Sequence[str], source: str) -> None:
    """Raise if two rows of ``source`` share an utterance id (they could not be matched to labels)."""
    seen: Dict[str, int] = {}
    for row, utt_id in enumerate(ids):
        if utt_id in seen:
            raise InputError(
                f"{source}: utterance id {utt_id} appears in rows {seen[utt_id] + 1} and {row + 1}; "
                "ids (file stems) must be unique to match labels"
            )
        seen[utt_id] = row


@dataclass
class IdMatch:
    """Result of matching feature utterances (in manifest order) with labelled utterances."""

    keep: np.ndarray  # int64 row indices of feature utterances that have labels
    no_labels: List[str]  # feature utterances without labels, in manifest order
    no_features: List[str]  # labelled utterances without features, sorted

    def dropped_rows(self) -> List[Tuple[str, str]]:
        """``(utt_id, reason)`` for everything left out of the outputs."""
        return [(utt, "no labels") for utt in self.no_labels] + [
            (utt, "labels without features") for utt in self.no_features
        ]


def match_ids(
    feature_ids: Sequence[str],
    label_ids: Iterable[str],
    feature_source: str,
    label_source: str,
    skip_missing: bool,
) -> IdMatch:
    """Match utterance ids; any mismatch is an error listing the ids unless ``skip_missing``."""
    label_set = set(label_ids)
    feature_set = set(feature_ids)
    keep = np.asarray([i for i, utt in enumerate(feature_ids) if utt in label_set], dtype=np.int64)
    match = IdMatch(
        keep=keep,
        no_labels=[utt for utt in feature_ids if utt not in label_set],
        no_features=sorted(label_set - feature_set),
    )
    problems = []
    if match.no_labels:
        problems.append(
            f"{len(match.no_labels)} utterance(s) of {feature_source} have no labels in {label_source}: "
            f"{format_ids(match.no_labels)}"
        )
    if match.no_features:
        problems.append(
            f"{len(match.no_features)} utterance(s) of {label_source} have no features in {feature_source}: "
            f"{format_ids(match.no_features)}"
        )
    if problems and not skip_missing:
        raise InputError(
            "; ".join(problems)
            + ". Pass --skip-missing to keep only the matched utterances (the dropped ones are listed)."
        )
    if not len(keep):
        raise InputError(f"no utterance of {feature_source} has labels in {label_source}")
    for problem in problems:
        print(f"skipped: {problem}", file=sys.stderr)
    return match


def add_label_arguments(parser) -> None:
    """The --num-classes and --label-rate flags shared by the label-writing tools."""
    parser.add_argument("--num-classes", type=int, default=512, help="number of clusters K; labels must be in [0, K)")
    parser.add_argument(
        "--label-rate",
        type=float,
        default=float(FBANK_FRAME_RATE_HZ),
        help="labels per second: 100 = one per 10 ms frame (stage 1), 50 = one per 20 ms model frame (stage 2 of a 20 ms model)",
    )


def check_num_classes(num_classes: int) -> None:
    """K must be positive."""
    if num_classes <= 0:
        raise ValueError(f"--num-classes must be positive, got {num_classes}")


def validate_labels(
    labels: np.ndarray, num_frames: int, num_classes: int, utt_id: str, source: str, stride: int = 1
) -> np.ndarray:
    """Check one utterance's labels: 1-D integers, one per ``stride`` manifest frames, all in [0, num_classes)."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise InputError(f"{source}: labels of utterance {utt_id} have shape {labels.shape}, expected 1-D")
    if labels.dtype.kind not in "iu":
        raise InputError(f"{source}: labels of utterance {utt_id} have dtype {labels.dtype}, expected integers")
    expected = expected_label_count(num_frames, stride)
    if abs(len(labels) - expected) > label_count_tolerance(stride):
        per = "" if stride == 1 else f" (one label per {stride} frames: {expected} expected)"
        raise InputError(
            f"{source}: utterance {utt_id} has {len(labels)} labels but {num_frames} feature frames{per}"
        )
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise InputError(
            f"{source}: utterance {utt_id} has label {labels[bad[0]]} at frame {bad[0]} outside "
            f"[0, {num_classes}) ({bad.size} such labels; set --num-classes if K is not {num_classes})"
        )
    return labels


@dataclass
class ManifestRows:
    """Rows of a manifest to write: root dir, relative paths, 10 ms frame counts, utterance ids."""

    root: str
    rel_paths: List[str]
    num_frames: np.ndarray
    utt_ids: List[str]

    def select(self, keep: np.ndarray) -> "ManifestRows":
        """Only rows ``keep``, in that order."""
        return ManifestRows(
            self.root,
            [self.rel_paths[i] for i in keep],
            self.num_frames[keep],
            [self.utt_ids[i] for i in keep],
        )


def write_label_outputs(
    out_dir: str,
    split: str,
    rows: ManifestRows,
    read_labels: Callable[[int], np.ndarray],
    label_source: str,
    num_classes: int,
    overwrite: bool,
    write_new_manifest: bool,
    dropped: Sequence[Tuple[str, str]] = (),
    stride: int = 1,
    inputs: Iterable[str] = (),
) -> Dict[str, str]:
    """Write ``{split}.km`` (row-aligned with ``rows``), ``dict.km.txt``, the dropped list and, last, the manifest.

    ``read_labels(i)`` returns the labels of row ``i``; each is validated
    against the row's frame count. Every output is checked for writability
    (and against the ``inputs`` files: none is ever replaced) before any work, staged, and published by renames (StagedOutputs), so a
    bad utterance leaves none of them behind and a kill never leaves new labels
    beside an old manifest. Returns the paths written, by kind.
    """
    km_path = os.path.join(out_dir, f"{split}.km")
    dict_path = os.path.join(out_dir, "dict.km.txt")
    manifest_path = os.path.join(out_dir, f"{split}.tsv")
    dropped_path = os.path.join(out_dir, f"{split}.dropped.txt")
    with StagedOutputs(f"{split}.labels", [out_dir], overwrite) as staged:
        # After the recovery on entry, which undoes what a killed run had published.
        refuse_replacing_inputs(
            [km_path, dict_path] + ([manifest_path] if write_new_manifest else []) + ([dropped_path] if dropped else []),
            inputs,
        )
        check_writable(km_path, overwrite)
        if write_new_manifest:
            check_writable(manifest_path, overwrite)
        if dropped:
            check_writable(dropped_path, overwrite)
        need_dict = dictionary_needs_writing(dict_path, num_classes, overwrite, "--num-classes is")

        format_line = LabelLineFormatter(num_classes)
        with writing(staged.path(km_path), "w") as handle:
            for i in with_progress(range(len(rows.utt_ids)), desc=f"{split}.km", unit="utt", mininterval=1.0):
                labels = validate_labels(
                    read_labels(i), int(rows.num_frames[i]), num_classes, rows.utt_ids[i], label_source, stride
                )
                handle.write(format_line(labels))
        written = {"labels": km_path}
        finals = []
        if need_dict:
            write_dictionary(staged.path(dict_path), num_classes)
            finals.append(dict_path)
            written["dictionary"] = dict_path
        if dropped:
            with writing(staged.path(dropped_path), "w") as handle:
                for utt_id, reason in dropped:
                    handle.write(f"{utt_id}\t{reason}\n")
            finals.append(dropped_path)
            written["dropped list"] = dropped_path
        finals.append(km_path)
        if write_new_manifest:
            write_manifest(staged.path(manifest_path), rows.root, zip(rows.rel_paths, rows.num_frames.tolist()))
            finals.append(manifest_path)
            written["manifest"] = manifest_path
        staged.publish(finals)  # the manifest (else the labels) last
    return written
