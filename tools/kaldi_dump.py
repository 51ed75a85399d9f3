"""Shared helpers for importing the original Mel-HuBERT release's Kaldi dumps.

The release ships Kaldi ``.scp``/``.ark`` pairs written on another machine, a
``.mean-var`` file of corpus sums, and text arks of cluster ids. This module
parses those files, finds each ark by file name when the absolute path written
in the scp does not exist here, reads text-ark label lines, and holds the
label/manifest matching and output writing shared by ``import_kaldi_labels``
and ``create_manifest``.
"""
from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from typing import IO, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from melhubert_fairseq.atomic_output import StagedOutputs, check_writable
from melhubert_fairseq.cli import with_progress
from melhubert_fairseq.errors import InputError, check_regular_file
from melhubert_fairseq.data.features import (
    FBANK_FRAME_RATE_HZ,
    MeanStd,
    expected_label_count,
    label_count_tolerance,
    load_mean_std,
    mean_std_from_sums,
)
from melhubert_fairseq.data.manifest import (
    parse_label_line,
    read_dictionary_size,
    write_dictionary,
    write_manifest,
)

#: How many utterance ids an error or skip report spells out before "... and N more".
LISTED_IDS = 20

_NPY_MAGIC = b"\x93NUMPY"


#: The name the Kaldi tools used for the project's one user-error type (kept for callers).
KaldiDumpError = InputError


@dataclass(frozen=True)
class ScpEntry:
    """One line of a Kaldi scp: utterance id, ark path as written, byte offset, scp line number."""

    utt_id: str
    written_path: str
    offset: int
    line_no: int


def read_scp(path: str) -> List[ScpEntry]:
    """Parse ``utt_id <ark path>:<byte offset>`` lines; reject empty files and duplicate ids."""
    check_regular_file(path, what="scp file")
    entries: List[ScpEntry] = []
    first_line: Dict[str, int] = {}
    with open(path, "r", encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            fields = line.strip().split(None, 1)
            if not fields:
                continue
            if len(fields) != 2:
                raise KaldiDumpError(
                    f"{path}:{line_no}: expected 'utt_id <path>.ark:<offset>', got {line.strip()!r}"
                )
            utt_id, spec = fields[0], fields[1].strip()
            if "/" in utt_id or "\\" in utt_id or utt_id in (".", ".."):
                raise KaldiDumpError(
                    f"{path}:{line_no}: utterance id {utt_id!r} cannot name a .npy file "
                    "(contains a path separator)"
                )
            if spec.endswith("|") or spec.startswith("|"):
                raise KaldiDumpError(
                    f"{path}:{line_no} ({utt_id}): piped rxspecifier {spec!r} is not supported; "
                    "the dump must point into ark files"
                )
            written_path, sep, offset_text = spec.rpartition(":")
            if not sep or not written_path or not offset_text.isdigit():
                raise KaldiDumpError(
                    f"{path}:{line_no} ({utt_id}): expected '<path>.ark:<byte offset>', got {spec!r}"
                )
            if utt_id in first_line:
                raise KaldiDumpError(
                    f"{path}:{line_no}: duplicate utterance id {utt_id!r} "
                    f"(first seen on line {first_line[utt_id]})"
                )
            first_line[utt_id] = line_no
            entries.append(ScpEntry(utt_id, written_path, int(offset_text), line_no))
    if not entries:
        raise KaldiDumpError(f"{path}: empty scp (no utterances)")
    return entries


def written_basename(written_path: str) -> str:
    """File name of a path written on another machine (either separator)."""
    return re.split(r"[\\/]", written_path)[-1]


def resolve_ark_paths(
    entries: Sequence[ScpEntry], scp_path: str, ark_dir: Optional[str] = None
) -> Dict[str, str]:
    """Map each written ark path to an existing file: as written, else by name in ``ark_dir`` / the scp's folder.

    Raises FileNotFoundError naming the first utterance that points at an ark
    found nowhere, and every path tried.
    """
    search_dirs = ([ark_dir] if ark_dir else []) + [os.path.dirname(os.path.abspath(scp_path))]
    resolved: Dict[str, str] = {}
    for entry in entries:
        if entry.written_path in resolved:
            continue
        tried = [entry.written_path]
        found = entry.written_path if os.path.isfile(entry.written_path) else None
        if found is None:
            name = written_basename(entry.written_path)
            for directory in search_dirs:
                candidate = os.path.join(directory, name)
                tried.append(candidate)
                if os.path.isfile(candidate):
                    found = candidate
                    break
        if found is None:
            users = sum(1 for e in entries if e.written_path == entry.written_path)
            raise FileNotFoundError(
                f"{scp_path}:{entry.line_no}: ark for utterance {entry.utt_id} not found "
                f"({users} utterance(s) use it); tried: {', '.join(tried)} "
                "(pass --ark-dir DIR if the arks live elsewhere)"
            )
        resolved[entry.written_path] = found
    return resolved


def _parse_bracketed_floats(text: str, where: str) -> np.ndarray:
    """Parse ``[a,b,c]`` (commas and/or spaces) into a float64 vector."""
    text = text.strip()
    if not (text.startswith("[") and text.endswith("]")):
        raise KaldiDumpError(f"{where}: expected a bracketed list like '[1.0,2.0,...]', got {text[:60]!r}")
    tokens = [tok for tok in re.split(r"[,\s]+", text[1:-1].strip()) if tok]
    try:
        return np.asarray([float(tok) for tok in tokens], dtype=np.float64)
    except ValueError:
        bad = next(tok for tok in tokens if not _is_float(tok))
        raise KaldiDumpError(f"{where}: {bad!r} is not a number") from None


def _is_float(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def read_mean_var(path: str) -> MeanStd:
    """Read a Kaldi-dump ``.mean-var`` file (``[sums]``, ``[sums of squares]``, frame count) as mean/std."""
    check_regular_file(path, what="mean-var file")
    with open(path, "r", encoding="utf-8") as handle:
        lines = [(no, line) for no, line in enumerate(handle, start=1) if line.strip()]
    if len(lines) != 3:
        raise KaldiDumpError(
            f"{path}: expected 3 non-empty lines ([sums], [sums of squares], frame count), got {len(lines)}"
        )
    total = _parse_bracketed_floats(lines[0][1], f"{path}:{lines[0][0]}")
    total_sq = _parse_bracketed_floats(lines[1][1], f"{path}:{lines[1][0]}")
    count_text = lines[2][1].strip()
    try:
        count = float(count_text)
    except ValueError:
        raise KaldiDumpError(f"{path}:{lines[2][0]}: frame count {count_text!r} is not a number") from None
    if not count.is_integer():
        raise KaldiDumpError(f"{path}:{lines[2][0]}: frame count {count_text!r} is not a whole number")
    try:
        return mean_std_from_sums(total, total_sq, int(count), path)
    except ValueError as err:
        raise KaldiDumpError(str(err)) from None


def load_normalization_stats(path: str) -> MeanStd:
    """Mean/std from a Kaldi ``.mean-var`` file or a (2, dim) ``mean-std.npy`` (told apart by content)."""
    check_regular_file(path, what="mean/std file")
    with open(path, "rb") as handle:
        magic = handle.read(len(_NPY_MAGIC))
    return load_mean_std(path) if magic == _NPY_MAGIC else read_mean_var(path)


def check_ark_key(handle: IO[bytes], offset: int, utt_id: str, ark_path: str) -> None:
    """Check that ``offset`` points just past ``'utt_id '`` in the ark, i.e. the scp matches this ark."""
    key = utt_id.encode("utf-8") + b" "
    if offset < len(key):
        found = b""
    else:
        handle.seek(offset - len(key))
        found = handle.read(len(key))
    if found != key:
        raise KaldiDumpError(
            f"{ark_path}: the scp entry of utterance {utt_id} (offset {offset}) does not point just past "
            f"'{utt_id} ' in this ark (found {found!r}): the scp and the ark do not match "
            "(wrong, rewritten or corrupt ark?); pass --skip-key-check only if the scp deliberately renames utterances"
        )


def parse_int_labels(line: bytes, where: str) -> np.ndarray:
    """Parse one text-ark label line (optionally ``[ ... ]``) into int64; errors name ``where``."""
    text = line.strip()
    if text.startswith(b"["):
        if not text.endswith(b"]"):
            raise KaldiDumpError(f"{where}: label line opens '[' but does not end with ']'")
        text = text[1:-1].strip()
    try:
        return parse_label_line(text, where)
    except ValueError as err:
        raise KaldiDumpError(str(err)) from None


def read_text_ark_labels(
    handle: IO[bytes], offset: int, utt_id: str, ark_path: str, check_key: bool = True
) -> np.ndarray:
    """Labels of ``utt_id`` from a text ark whose scp offset points just past ``'utt_id '``."""
    if check_key:
        check_ark_key(handle, offset, utt_id, ark_path)
    handle.seek(offset)
    line = handle.readline()
    if not line:
        raise KaldiDumpError(f"{ark_path}: offset {offset} of utterance {utt_id} is past the end of the ark (truncated?)")
    return parse_int_labels(line, f"{ark_path} (utterance {utt_id}, offset {offset})")


class ArkHandles:
    """Binary handles to ark files, kept open so consecutive reads from one ark reuse one handle."""

    def __init__(self, max_open: int = 64) -> None:
        self.max_open = max_open
        self.handles: Dict[str, IO[bytes]] = {}

    def get(self, path: str) -> IO[bytes]:
        """An open binary handle to ``path`` (oldest handle closed past ``max_open``)."""
        handle = self.handles.get(path)
        if handle is None:
            if len(self.handles) >= self.max_open:
                oldest = next(iter(self.handles))
                self.handles.pop(oldest).close()
            handle = self.handles[path] = open(path, "rb")
        return handle

    def close(self) -> None:
        """Close every handle."""
        for handle in self.handles.values():
            handle.close()
        self.handles.clear()


def format_ids(ids: Sequence[str], limit: int = LISTED_IDS) -> str:
    """``a, b, c, ... and N more`` for reports that must name utterances without flooding the terminal."""
    shown = ", ".join(ids[:limit])
    return shown + (f", ... and {len(ids) - limit} more" if len(ids) > limit else "")


def check_unique_ids(ids: Sequence[str], source: str) -> None:
    """Raise if two rows of ``source`` share an utterance id (they could not be matched to labels)."""
    seen: Dict[str, int] = {}
    for row, utt_id in enumerate(ids):
        if utt_id in seen:
            raise KaldiDumpError(
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
        raise KaldiDumpError(
            "; ".join(problems)
            + ". Pass --skip-missing to keep only the matched utterances (the dropped ones are listed)."
        )
    if not len(keep):
        raise KaldiDumpError(f"no utterance of {feature_source} has labels in {label_source}")
    for problem in problems:
        print(f"skipped: {problem}", file=sys.stderr)
    return match


def add_label_arguments(parser) -> None:
    """The --num-classes and --label-rate flags shared by the label-writing tools."""
    parser.add_argument("--num-classes", type=int, default=512, help="number of clusters K; labels must be in [0, K)")
    parser.add_argument(
        "--label-rate",
        type=float,
        default=100.0,
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
        raise KaldiDumpError(f"{source}: labels of utterance {utt_id} have shape {labels.shape}, expected 1-D")
    if labels.dtype.kind not in "iu":
        raise KaldiDumpError(f"{source}: labels of utterance {utt_id} have dtype {labels.dtype}, expected integers")
    expected = expected_label_count(num_frames, stride)
    if abs(len(labels) - expected) > label_count_tolerance(stride):
        per = "" if stride == 1 else f" (one label per {stride} frames: {expected} expected)"
        raise KaldiDumpError(
            f"{source}: utterance {utt_id} has {len(labels)} labels but {num_frames} feature frames{per}"
        )
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise KaldiDumpError(
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


def check_dictionary_writable(path: str, num_classes: int, overwrite: bool) -> bool:
    """True if ``dict.km.txt`` must be written; an existing one for the same K is reused as is."""
    existing = read_dictionary_size(path)
    if existing is None or overwrite:
        return True
    if existing == num_classes:
        return False
    raise FileExistsError(
        f"{path} lists {existing} clusters but --num-classes is {num_classes}; pass --overwrite to replace it"
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
) -> Dict[str, str]:
    """Write ``{split}.km`` (row-aligned with ``rows``), ``dict.km.txt``, the dropped list and, last, the manifest.

    ``read_labels(i)`` returns the labels of row ``i``; each is validated
    against the row's frame count. Every output is checked for writability
    before any work, staged, and published by renames (StagedOutputs), so a
    bad utterance leaves none of them behind and a kill never leaves new labels
    beside an old manifest. Returns the paths written, by kind.
    """
    km_path = os.path.join(out_dir, f"{split}.km")
    dict_path = os.path.join(out_dir, "dict.km.txt")
    manifest_path = os.path.join(out_dir, f"{split}.tsv")
    dropped_path = os.path.join(out_dir, f"{split}.dropped.txt")
    with StagedOutputs(f"{split}.labels", [out_dir], overwrite) as staged:
        # After the recovery on entry, which undoes what a killed run had published.
        check_writable(km_path, overwrite)
        if write_new_manifest:
            check_writable(manifest_path, overwrite)
        if dropped:
            check_writable(dropped_path, overwrite)
        need_dict = check_dictionary_writable(dict_path, num_classes, overwrite)

        with open(staged.path(km_path), "w", encoding="utf-8") as handle:
            for i in with_progress(range(len(rows.utt_ids)), desc=f"{split}.km", unit="utt", mininterval=1.0):
                labels = validate_labels(
                    read_labels(i), int(rows.num_frames[i]), num_classes, rows.utt_ids[i], label_source, stride
                )
                handle.write(" ".join(map(str, labels.tolist())) + "\n")
        written = {"labels": km_path}
        finals = []
        if need_dict:
            write_dictionary(staged.path(dict_path), num_classes)
            finals.append(dict_path)
            written["dictionary"] = dict_path
        if dropped:
            with open(staged.path(dropped_path), "w", encoding="utf-8") as handle:
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


def summary_line(action: str, utterances: int, frames: int, seconds: float, written: Dict[str, str]) -> str:
    """Closing line of every import tool: utterances, hours, frames, time taken and the files written."""
    hours = frames / FBANK_FRAME_RATE_HZ / 3600
    outputs = "; ".join(f"{kind}: {path}" for kind, path in written.items())
    return f"{action} {utterances} utterances, {hours:.2f} h ({frames} frames) in {seconds:.1f} s -> {outputs}"

