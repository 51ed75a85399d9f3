"""Fine-tuning ``mel_hubert`` checkpoints with fairseq's CTC models (``wav2vec_ctc``).

* Data: audio manifests + transcripts -> fairseq's ``audio_finetuning`` layout in one
  folder: ``{split}.tsv`` (audio manifest with an absolute root), ``{split}.wrd`` (one
  transcript per line), ``{split}.ltr`` (letters separated by spaces, ``|`` after every
  word, as fairseq's ``examples/wav2vec/libri_labels.py`` writes them) and
  ``dict.ltr.txt`` (fairseq ``Dictionary``: ``symbol count`` lines).
* Checkpoints: :func:`check_finetuning_checkpoint` says in one line why a file cannot
  be fine-tuned on audio (not a ``mel_hubert`` checkpoint, or one without its fbank
  statistics) before fairseq starts.
"""
from __future__ import annotations

import collections
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Mapping, Tuple

from melhubert_fairseq.atomic_output import atomic_output
from melhubert_fairseq.data.audio_manifest import write_audio_manifest
from melhubert_fairseq.data.manifest import AUDIO, iter_tsv_manifest
from melhubert_fairseq.errors import InputError
from melhubert_fairseq.file_sniffing import CheckpointFormatError

#: fairseq's word boundary symbol in letter targets.
WORD_BOUNDARY = "|"

#: What a normalised transcript keeps: upper-case letters and the apostrophe (LibriSpeech's alphabet).
_NOT_IN_ALPHABET = re.compile(r"[^A-Z' ]+")

#: Column names of a transcripts table (``demo/corpus/transcripts.tsv``).
TRANSCRIPT_COLUMNS = ("utt_id", "text")


def normalise_transcript(text: str) -> str:
    """Upper-case words of A-Z and apostrophes, single spaces: punctuation and other symbols are dropped."""
    return " ".join(_NOT_IN_ALPHABET.sub(" ", text.upper()).split())


def letter_targets(words: str) -> str:
    """``"HI THERE"`` -> ``"H I | T H E R E |"``: fairseq's letter targets of a normalised transcript."""
    return " ".join(f"{' '.join(word)} {WORD_BOUNDARY}" for word in words.split())


def read_transcripts(path: str) -> Dict[str, str]:
    """utt_id -> text of a tab-separated table with ``utt_id`` and ``text`` columns (header first)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"transcripts not found: {path}")
    texts: Dict[str, str] = {}
    with open(path, encoding="utf-8") as handle:
        header = handle.readline().rstrip("\n").split("\t")
        missing = [name for name in TRANSCRIPT_COLUMNS if name not in header]
        if missing:
            raise InputError(f"{path}:1: header has no {' or '.join(missing)} column (it has {', '.join(header)})")
        id_column, text_column = (header.index(name) for name in TRANSCRIPT_COLUMNS)
        for line_no, line in enumerate(handle, start=2):
            fields = line.rstrip("\n").split("\t")
            if not line.strip():
                continue
            if len(fields) != len(header):
                raise InputError(f"{path}:{line_no}: {len(fields)} columns, the header has {len(header)}")
            utt_id = fields[id_column]
            if utt_id in texts:
                raise InputError(f"{path}:{line_no} ({utt_id}): second transcript for this utterance")
            texts[utt_id] = fields[text_column]
    return texts


@dataclass
class FinetuningSplit:
    """What :func:`write_finetuning_data` wrote for one split."""

    name: str
    num_utterances: int
    num_samples: int
    num_letters: int


def _split_rows(manifest: str, transcripts: Mapping[str, str], transcripts_path: str) -> Tuple[str, List[tuple]]:
    """(absolute root, [(relative path, num_samples, words)]) of an audio manifest; errors name its line."""
    rows = []
    root = None
    for root, line_no, rel_path, num_samples in iter_tsv_manifest(manifest, AUDIO):
        utt_id = os.path.splitext(os.path.basename(rel_path))[0]
        where = f"{manifest}:{line_no} ({utt_id})"
        if "\t" in rel_path:
            raise InputError(f"{where}: path contains a tab")
        if utt_id not in transcripts:
            raise InputError(f"{where}: no transcript for this utterance in {transcripts_path}")
        words = normalise_transcript(transcripts[utt_id])
        if not words:
            raise InputError(f"{where}: transcript {transcripts[utt_id]!r} has no letters A-Z")
        rows.append((rel_path, num_samples, words))
    if root is None:
        raise InputError(f"{manifest}: no utterances after the root line")
    # iter_tsv_manifest resolves a relative root against the manifest's folder; fairseq's FileAudioDataset
    # would take it relative to the working directory, so the copy gets this absolute root.
    return root, rows


def write_finetuning_data(
    manifests: Mapping[str, str], transcripts_path: str, out_dir: str, overwrite: bool = False
) -> List[FinetuningSplit]:
    """Write ``{split}.tsv/.wrd/.ltr`` for every ``split -> audio manifest`` and one ``dict.ltr.txt``.

    Every input is read and checked before anything is written; each file is written atomically.
    The dictionary lists every letter of every split, most frequent first (fairseq's order).
    """
    transcripts = read_transcripts(transcripts_path)
    planned = {split: _split_rows(path, transcripts, transcripts_path) for split, path in manifests.items()}
    counts: collections.Counter = collections.Counter()
    for _root, rows in planned.values():
        for _path, _samples, words in rows:
            counts.update(letter_targets(words).split())
    outputs = [os.path.join(out_dir, f"{split}.{ext}") for split in planned for ext in ("tsv", "wrd", "ltr")]
    outputs.append(os.path.join(out_dir, "dict.ltr.txt"))
    existing = [path for path in outputs if os.path.exists(path)]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} already exists; refusing to overwrite it (pass overwrite=True)")
    written = []
    for split, (root, rows) in planned.items():
        write_audio_manifest(
            os.path.join(out_dir, f"{split}.tsv"), root, [(path, samples) for path, samples, _words in rows], overwrite
        )
        with atomic_output(os.path.join(out_dir, f"{split}.wrd"), overwrite=overwrite) as handle:
            handle.writelines(f"{words}\n" for _path, _samples, words in rows)
        with atomic_output(os.path.join(out_dir, f"{split}.ltr"), overwrite=overwrite) as handle:
            handle.writelines(f"{letter_targets(words)}\n" for _path, _samples, words in rows)
        written.append(
            FinetuningSplit(
                split,
                len(rows),
                sum(samples for _path, samples, _words in rows),
                sum(len(letter_targets(words).split()) for _path, _samples, words in rows),
            )
        )
    with atomic_output(os.path.join(out_dir, "dict.ltr.txt"), overwrite=overwrite) as handle:
        handle.writelines(f"{letter} {count}\n" for letter, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    return written


def check_finetuning_checkpoint(path: str) -> None:
    """Raise :class:`CheckpointFormatError` naming ``path`` unless it is a ``mel_hubert`` checkpoint that can
    take audio (it records the fbank statistics its training features were normalised with)."""
    # Deferred: the fine-tuning data tools import this module, and their --help must not import torch.
    import torch

    from melhubert_fairseq.original.export import read_mel_hubert_checkpoint  # imports torch: as above

    state, _cfg = read_mel_hubert_checkpoint(path, purpose="this fine-tuning starts from a mel_hubert model")
    stats = state["model"].get("fbank_mean_std")
    if stats is None or bool(torch.isnan(stats).any()):
        raise CheckpointFormatError(
            f"{path}: this mel_hubert checkpoint does not record the fbank mean/std its features were normalised "
            "with, so it cannot be fine-tuned on audio; store them with melhubert-convert-original --mean-std FILE "
            "or pretrain with {task.data}/mean-std.npy present"
        )

