"""Audio manifests (fairseq's wav2vec layout: a root line, then ``relative/path.flac<TAB>num_samples``
rows) and folders of audio files, read as the utterances the audio tools work through.

The format is :mod:`melhubert_fairseq.data.manifest`'s, shared with feature
manifests: a relative root is read against the manifest's own folder.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, List, Optional, Tuple

from melhubert_fairseq.output_guards import safe_relative_path
from melhubert_fairseq.data.manifest import AUDIO, iter_tsv_manifest, write_tsv_manifest
from melhubert_fairseq.errors import InputError

#: Audio files :func:`list_audio_dir` lists.
AUDIO_EXTENSIONS = (".wav", ".flac")


@dataclass(frozen=True)
class AudioItem:
    """One input utterance: where its audio is and how to name it in errors."""

    relative_path: str
    full_path: str
    expected_samples: Optional[int]
    where: str

    @property
    def feature_path(self) -> str:
        """Relative path of its feature file: the audio path with ``.npy`` for the extension."""
        return os.path.splitext(self.relative_path)[0] + ".npy"


def read_audio_manifest(path: str, feature_manifest_advice: Optional[str] = None) -> List[AudioItem]:
    """Parse a fairseq audio manifest (a relative root is read against the manifest's folder); a feature
    manifest is refused with ``feature_manifest_advice`` (default: it needs no fbank extraction)."""
    items = []
    for root, line_no, rel_path, num_samples in iter_tsv_manifest(path, AUDIO, feature_manifest_advice):
        utt_id = os.path.splitext(os.path.basename(rel_path))[0]
        where = f"{path}:{line_no} ({utt_id})"
        # The feature file mirrors this path below --out-dir: it must stay there.
        rel_path = safe_relative_path(rel_path, where)
        items.append(AudioItem(rel_path, os.path.join(root, rel_path), num_samples, where))
    if not items:
        raise InputError(f"{path}: no utterances after the root line")
    return items


def list_audio_dir(audio_dir: str) -> List[AudioItem]:
    """Every .wav/.flac file below ``audio_dir`` (symlinked folders followed once), sorted by relative path."""
    if not os.path.isdir(audio_dir):
        raise FileNotFoundError(f"audio directory not found: {audio_dir}")
    items = []
    visited = set()
    for dirpath, dirnames, filenames in os.walk(audio_dir, followlinks=True):
        # Corpora are often assembled from symlinked speaker folders; a link back up the
        # tree (or two links to one folder) would list the same audio twice, so each real
        # folder is walked once.
        real = os.path.realpath(dirpath)
        if real in visited:
            dirnames[:] = []
            continue
        visited.add(real)
        dirnames.sort()
        for name in sorted(filenames):
            if name.lower().endswith(AUDIO_EXTENSIONS):
                full_path = os.path.join(dirpath, name)
                rel_path = os.path.relpath(full_path, audio_dir)
                items.append(AudioItem(rel_path, full_path, None, f"utterance {os.path.splitext(name)[0]}"))
    if not items:
        raise InputError(f"{audio_dir}: no {'/'.join(AUDIO_EXTENSIONS)} files found")
    return sorted(items, key=lambda item: item.relative_path)


def write_audio_manifest(path: str, root: str, rows: Iterable[Tuple[str, int]], overwrite: bool = False) -> int:
    """Atomically write an audio manifest of ``(relative_path, num_samples)`` rows; return the row count."""
    return write_tsv_manifest(path, root, rows, AUDIO, overwrite)
