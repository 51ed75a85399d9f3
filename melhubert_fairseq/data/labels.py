"""k-means label files: ``{split}.km`` (one line of space-separated cluster ids per manifest row) and
fairseq's ``dict.km.txt`` (one ``symbol count`` line per cluster).

A ``.km`` file is never held in memory: :func:`index_label_file` records the
byte offset and label count of each line, and :class:`LabelIndex` reads one
line on demand (LibriSpeech-960's labels are 1.4 GB of text).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import numpy as np

from melhubert_fairseq.atomic_output import atomic_output
from melhubert_fairseq.data.frame_rates import expected_label_count, label_count_tolerance
from melhubert_fairseq.errors import InputError, check_regular_file

#: The label extension of k-means labels: ``{split}.km`` (fairseq HuBERT's ``task.labels``).
KM_LABELS = "km"


def dictionary_name(labels: str = KM_LABELS) -> str:
    """File name of the fairseq dictionary of labels ``labels``: ``dict.km.txt`` for k-means labels."""
    return f"dict.{labels}.txt"


#: The dictionary every label-writing tool writes beside its ``{split}.km``.
KM_DICTIONARY_NAME = dictionary_name(KM_LABELS)


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
        raise InputError(f"{where}: label {bad!r} is not an integer") from None


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


def check_num_classes(num_classes: int) -> None:
    """K must be positive."""
    if num_classes <= 0:
        raise InputError(f"--num-classes must be positive, got {num_classes}")


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
