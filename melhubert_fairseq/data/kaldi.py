"""Readers of the original Mel-HuBERT release's Kaldi dumps.

The release ships Kaldi ``.scp``/``.ark`` pairs written on another machine, a
``.mean-var`` file of corpus sums, and text arks of cluster ids. This module
parses the scp files, finds each ark by file name when the absolute path written
in the scp does not exist here, checks that each scp offset points at its
utterance's key, and reads binary feature matrices (decoded by kaldiio),
text-ark label lines and ``.mean-var`` statistics. Errors are
:class:`~melhubert_fairseq.errors.InputError` naming the file, line or offset and utterance.
"""
from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from typing import IO, Dict, List, Optional, Sequence

import numpy as np
from kaldiio.matio import read_kaldi

from melhubert_fairseq.data.features import MeanStd, load_mean_std, mean_std_from_sums
from melhubert_fairseq.data.labels import parse_label_line
from melhubert_fairseq.errors import InputError, check_regular_file
from melhubert_fairseq.file_formats import NPY_MAGIC


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
                raise InputError(
                    f"{path}:{line_no}: expected 'utt_id <path>.ark:<offset>', got {line.strip()!r}"
                )
            utt_id, spec = fields[0], fields[1].strip()
            if "/" in utt_id or "\\" in utt_id or utt_id in (".", ".."):
                raise InputError(
                    f"{path}:{line_no}: utterance id {utt_id!r} cannot name a .npy file "
                    "(contains a path separator)"
                )
            if spec.endswith("|") or spec.startswith("|"):
                raise InputError(
                    f"{path}:{line_no} ({utt_id}): piped rxspecifier {spec!r} is not supported; "
                    "the dump must point into ark files"
                )
            written_path, sep, offset_text = spec.rpartition(":")
            if not sep or not written_path or not offset_text.isdigit():
                raise InputError(
                    f"{path}:{line_no} ({utt_id}): expected '<path>.ark:<byte offset>', got {spec!r}"
                )
            if utt_id in first_line:
                raise InputError(
                    f"{path}:{line_no}: duplicate utterance id {utt_id!r} "
                    f"(first seen on line {first_line[utt_id]})"
                )
            first_line[utt_id] = line_no
            entries.append(ScpEntry(utt_id, written_path, int(offset_text), line_no))
    if not entries:
        raise InputError(f"{path}: empty scp (no utterances)")
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
        raise InputError(f"{where}: expected a bracketed list like '[1.0,2.0,...]', got {text[:60]!r}")
    tokens = [tok for tok in re.split(r"[,\s]+", text[1:-1].strip()) if tok]
    try:
        return np.asarray([float(tok) for tok in tokens], dtype=np.float64)
    except ValueError:
        bad = next(tok for tok in tokens if not _is_float(tok))
        raise InputError(f"{where}: {bad!r} is not a number") from None


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
        raise InputError(
            f"{path}: expected 3 non-empty lines ([sums], [sums of squares], frame count), got {len(lines)}"
        )
    total = _parse_bracketed_floats(lines[0][1], f"{path}:{lines[0][0]}")
    total_sq = _parse_bracketed_floats(lines[1][1], f"{path}:{lines[1][0]}")
    count_text = lines[2][1].strip()
    try:
        count = float(count_text)
    except ValueError:
        raise InputError(f"{path}:{lines[2][0]}: frame count {count_text!r} is not a number") from None
    if not count.is_integer():
        raise InputError(f"{path}:{lines[2][0]}: frame count {count_text!r} is not a whole number")
    try:
        return mean_std_from_sums(total, total_sq, int(count), path)
    except ValueError as err:
        raise InputError(str(err)) from None


def load_normalization_stats(path: str) -> MeanStd:
    """Mean/std from a Kaldi ``.mean-var`` file or a (2, dim) ``mean-std.npy`` (told apart by content)."""
    check_regular_file(path, what="mean/std file")
    with open(path, "rb") as handle:
        magic = handle.read(len(NPY_MAGIC))
    return load_mean_std(path) if magic == NPY_MAGIC else read_mean_var(path)


def check_ark_key(handle: IO[bytes], offset: int, utt_id: str, ark_path: str) -> None:
    """Check that ``offset`` points just past ``'utt_id '`` in the ark, i.e. the scp matches this ark."""
    key = utt_id.encode("utf-8") + b" "
    if offset < len(key):
        found = b""
    else:
        handle.seek(offset - len(key))
        found = handle.read(len(key))
    if found != key:
        raise InputError(
            f"{ark_path}: the scp entry of utterance {utt_id} (offset {offset}) does not point just past "
            f"'{utt_id} ' in this ark (found {found!r}): the scp and the ark do not match "
            "(wrong, rewritten or corrupt ark?); pass --skip-key-check only if the scp deliberately renames utterances"
        )


def parse_int_labels(line: bytes, where: str) -> np.ndarray:
    """Parse one text-ark label line (optionally ``[ ... ]``) into int64; errors name ``where``."""
    text = line.strip()
    if text.startswith(b"["):
        if not text.endswith(b"]"):
            raise InputError(f"{where}: label line opens '[' but does not end with ']'")
        text = text[1:-1].strip()
    try:
        return parse_label_line(text, where)
    except ValueError as err:
        raise InputError(str(err)) from None


def read_text_ark_labels(
    handle: IO[bytes], offset: int, utt_id: str, ark_path: str, check_key: bool = True
) -> np.ndarray:
    """Labels of ``utt_id`` from a text ark whose scp offset points just past ``'utt_id '``."""
    if check_key:
        check_ark_key(handle, offset, utt_id, ark_path)
    handle.seek(offset)
    line = handle.readline()
    if not line:
        raise InputError(f"{ark_path}: offset {offset} of utterance {utt_id} is past the end of the ark (truncated?)")
    return parse_int_labels(line, f"{ark_path} (utterance {utt_id}, offset {offset})")


def read_feature_matrix(handle: IO[bytes], offset: int, utt_id: str, ark_path: str, check_key: bool) -> np.ndarray:
    """Read one binary Kaldi matrix (CM/CM2/CM3/FM/DM, decoded by kaldiio) at ``offset``."""
    if check_key:
        check_ark_key(handle, offset, utt_id, ark_path)
    handle.seek(offset)
    try:
        # read_kaldi on our own handle rather than load_mat("path:offset"):
        # load_mat re-parses the path as a Kaldi rxspecifier ('[..]' slices, '|' pipes).
        feats = read_kaldi(handle)
    except (ValueError, AssertionError, struct.error, EOFError, UnicodeDecodeError, RuntimeError) as err:
        raise InputError(
            f"{ark_path}: cannot read the matrix of utterance {utt_id} at offset {offset} "
            f"(truncated or corrupt ark): {type(err).__name__}: {err}"
        ) from None
    if not isinstance(feats, np.ndarray) or feats.ndim != 2 or feats.dtype.kind != "f":
        what = f"{feats.dtype} array of shape {feats.shape}" if isinstance(feats, np.ndarray) else type(feats).__name__
        raise InputError(
            f"{ark_path}: utterance {utt_id} at offset {offset} holds a {what}, expected a float matrix (frames, dim)"
        )
    return feats


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
