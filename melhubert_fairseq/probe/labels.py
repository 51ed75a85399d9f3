"""The probes' labels: ``.phn`` (phones) and ``.spk`` (speaker) files beside a manifest, one line per row.

``{split}.phn`` holds one line of space-separated phones per manifest row and
``{split}.spk`` one speaker id per row, in the manifest's order (the layout
fairseq uses for ``.wrd``/``.ltr`` transcripts). Every problem is an
:class:`~melhubert_fairseq.errors.InputError` naming the file, the line and
the utterance.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Sequence

import numpy as np

from melhubert_fairseq.errors import InputError, check_regular_file

#: Label file extensions: phone transcripts and speaker ids.
PHONES, SPEAKERS = "phn", "spk"


def label_file_beside(manifest_path: str, extension: str) -> str:
    """``{split}.{extension}`` beside ``{split}.tsv``."""
    return os.path.splitext(manifest_path)[0] + "." + extension


@dataclass(frozen=True)
class RowLabel:
    """One row's label line: the tokens and where they came from (``file:line (utterance)``)."""

    tokens: tuple
    where: str


def read_row_labels(manifest_path: str, utt_ids: Sequence[str], extension: str) -> List[RowLabel]:
    """The ``.phn``/``.spk`` file beside ``manifest_path``, one line per manifest row (``utt_ids``, in order).

    A line count other than the manifest's, an empty line, or (``.spk``) more
    than one speaker on a line is an InputError naming the file and line.
    """
    path = label_file_beside(manifest_path, extension)
    what = "phone transcript (.phn)" if extension == PHONES else "speaker label (.spk)"
    check_regular_file(path, what=f"{what} file for {manifest_path}")
    with open(path, encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) != len(utt_ids):
        if len(lines) < len(utt_ids):
            missing = len(lines)
            raise InputError(
                f"{path}:{missing + 1} ({utt_ids[missing]}): missing: the file has {len(lines)} lines but "
                f"{manifest_path} has {len(utt_ids)} utterances; write one {what} line per manifest row, in its order"
            )
        raise InputError(
            f"{path}:{len(utt_ids) + 1}: one line too many: the file has {len(lines)} lines but {manifest_path} has "
            f"{len(utt_ids)} utterances; write one {what} line per manifest row, in its order"
        )
    labels = []
    for line_no, (line, utt_id) in enumerate(zip(lines, utt_ids), start=1):
        where = f"{path}:{line_no} ({utt_id})"
        tokens = tuple(line.split())
        if not tokens:
            raise InputError(f"{where}: empty line, expected {'phones' if extension == PHONES else 'a speaker id'}")
        if extension == SPEAKERS and len(tokens) != 1:
            raise InputError(f"{where}: expected one speaker id, got {len(tokens)} words: {line.strip()!r}")
        labels.append(RowLabel(tokens, where))
    return labels


@dataclass
class Vocabulary:
    """Symbols seen in training, in first-seen order; index 0 is reserved when ``reserve_blank`` (CTC)."""

    symbols: List[str]
    reserve_blank: bool
    source: str
    index: Dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        offset = 1 if self.reserve_blank else 0
        self.index = {symbol: i + offset for i, symbol in enumerate(self.symbols)}

    @classmethod
    def from_labels(cls, labels: Sequence[RowLabel], reserve_blank: bool, source: str) -> "Vocabulary":
        """Every symbol of the training ``labels`` (``source`` names them in errors)."""
        seen: Dict[str, None] = {}
        for label in labels:
            seen.update(dict.fromkeys(label.tokens))
        return cls(list(seen), reserve_blank, source)

    def __len__(self) -> int:
        """Number of outputs a head needs (symbols, plus the blank)."""
        return len(self.symbols) + (1 if self.reserve_blank else 0)

    def encode(self, label: RowLabel, kind: str) -> np.ndarray:
        """A label's ids; a symbol never seen in training is an InputError naming its line."""
        try:
            return np.array([self.index[token] for token in label.tokens], dtype=np.int64)
        except KeyError as err:
            raise InputError(
                f"{label.where}: {kind} {err.args[0]!r} never occurs in the training labels ({self.source}): "
                f"the head has no output for it; add utterances with it to the training set or drop this one"
            ) from None


def few_shot_split(
    speakers: Sequence[RowLabel], shots: int, seed: int, spk_source: str
) -> tuple:
    """(train rows, test rows): ``shots`` rows of every speaker drawn for training with ``seed``, the rest
    for testing. A speaker with at most ``shots`` rows is an InputError naming its first line."""
    by_speaker: Dict[str, List[int]] = {}
    for row, label in enumerate(speakers):
        by_speaker.setdefault(label.tokens[0], []).append(row)
    for speaker, rows in by_speaker.items():
        if len(rows) <= shots:
            raise InputError(
                f"{speakers[rows[0]].where}: speaker {speaker!r} has {len(rows)} utterance(s) in {spk_source}, "
                f"but --shots {shots} needs {shots} to train on and at least one to test; lower --shots or drop "
                "this speaker"
            )
    rng = np.random.default_rng(seed)
    train: List[int] = []
    for speaker in sorted(by_speaker):
        train.extend(rng.choice(by_speaker[speaker], size=shots, replace=False).tolist())
    train_set = set(train)
    test = [row for row in range(len(speakers)) if row not in train_set]
    return sorted(train), test


def check_known_speakers(train: Sequence[RowLabel], test: Sequence[RowLabel], source: str) -> None:
    """A test speaker absent from the training rows is an InputError naming its line."""
    known = {label.tokens[0] for label in train}
    for label in test:
        if label.tokens[0] not in known:
            raise InputError(
                f"{label.where}: speaker {label.tokens[0]!r} never occurs in the training speakers ({source}): "
                "speaker identification can only name speakers it was trained on"
            )


def read_phone_map(path: str) -> Dict[str, str]:
    """A phone folding (e.g. TIMIT's 61 -> 39): ``phone replacement`` per line; ``#`` starts a comment line."""
    check_regular_file(path, what="phone map")
    mapping: Dict[str, str] = {}
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            if len(fields) != 2:
                raise InputError(f"{path}:{line_no}: expected 'phone replacement', got {line.strip()!r}")
            if fields[0] in mapping:
                raise InputError(f"{path}:{line_no}: phone {fields[0]!r} is mapped twice")
            mapping[fields[0]] = fields[1]
    return mapping


def map_phones(labels: Sequence[RowLabel], mapping: Dict[str, str]) -> List[RowLabel]:
    """``labels`` with every phone of ``mapping`` replaced (the others kept)."""
    return [RowLabel(tuple(mapping.get(token, token) for token in label.tokens), label.where) for label in labels]
