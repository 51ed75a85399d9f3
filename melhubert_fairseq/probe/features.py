"""Frozen upstream features for the probes, extracted once per upstream.

Three upstreams:

* ``pretrained``: every hidden state of a ``mel_hubert`` checkpoint (L + 1 of them: the input of
  the first transformer layer, then each layer's output);
* ``random init``: the same network freshly initialised from a seed, keeping only the
  checkpoint's fbank statistics (so audio is normalised the same way);
* ``fbank``: the normalised, stacked fbank frames the model reads (one state), the floor.

Every state is layer-normalised per frame (no learned scale or bias), so the learnable
weighted sum weighs states of different magnitudes on equal terms. What the probes keep:
all frames of every state (for PR), and each utterance's mean over its real frames (for SID:
mean pooling commutes with the weighted sum, so the pooled states are all SID needs).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from melhubert_fairseq.cli import with_progress
from melhubert_fairseq.data.fbank import load_audio
from melhubert_fairseq.data.features import read_feature_file, stack_frames
from melhubert_fairseq.data.manifest import AUDIO, FEATURES, iter_tsv_manifest
from melhubert_fairseq.errors import InputError
from melhubert_fairseq.feature_reader import MelHubertFeatureReader
from melhubert_fairseq.models.mel_hubert import MelHubertModel

#: Upstream names, in the order tables list them.
FBANK, RANDOM_INIT, PRETRAINED = "fbank", "random init", "pretrained"


@dataclass(frozen=True)
class ManifestRow:
    """One utterance of a probe manifest: its file, how to name it, and its 10 ms frames or samples."""

    full_path: str
    where: str
    utt_id: str
    count: int
    kind: str  # AUDIO or FEATURES


def read_probe_manifest(path: str) -> List[ManifestRow]:
    """The rows of an audio or a fbank feature manifest; the kind is that of its first row's file."""
    kind = AUDIO
    try:
        next(iter_tsv_manifest(path, AUDIO), None)
    except InputError:  # its first row is a .npy file
        kind = FEATURES
    rows = []
    for root, line_no, rel_path, count in iter_tsv_manifest(path, kind):
        utt_id = os.path.splitext(os.path.basename(rel_path))[0]
        rows.append(ManifestRow(os.path.join(root, rel_path), f"{path}:{line_no} ({utt_id})", utt_id, count, kind))
    if not rows:
        raise InputError(f"{path}: empty manifest (no utterances after the root line)")
    return rows


@dataclass
class ProbeFeatures:
    """One upstream's features of a list of utterances.

    ``frames``: (S, total frames, C) every state of every utterance back to back (``offsets``, N + 1);
    ``pooled``: (N, S, C) each utterance's mean over its frames; either may be None when not asked for.
    """

    upstream: str
    num_states: int
    offsets: np.ndarray
    frames: Optional[np.ndarray]
    pooled: Optional[np.ndarray]

    def utterance(self, row: int) -> np.ndarray:
        """(S, T, C) states of one utterance."""
        return self.frames[:, self.offsets[row] : self.offsets[row + 1]]

    def lengths(self) -> np.ndarray:
        """Frames of every utterance."""
        return np.diff(self.offsets)


class Upstream:
    """A frozen feature extractor: model inputs of a batch -> its states."""

    def __init__(self, name: str, reader=None, stack: int = 2, device: str = "cpu") -> None:
        """``reader``: a :class:`~melhubert_fairseq.feature_reader.MelHubertFeatureReader` (None only for
        ``fbank`` over feature manifests, stacked ``stack`` frames at a time)."""
        if reader is None and name != FBANK:
            raise InputError(f"the {name} upstream needs a checkpoint")
        self.name = name
        self.reader = reader
        self.stack = reader.stack if reader is not None else stack
        self.device = reader.device if reader is not None else device

    @property
    def num_states(self) -> int:
        """States the weighted sum runs over: L + 1 for a model, 1 for fbank."""
        return 1 if self.name == FBANK else self.reader.num_layers + 1

    def model_input(self, row: ManifestRow) -> np.ndarray:
        """A row's model input: normalised stacked frames, or (through the model) a 16 kHz waveform."""
        if row.kind == AUDIO:
            if self.reader is None:
                raise InputError(
                    f"{row.where}: an audio manifest needs a checkpoint for its fbank statistics (--checkpoint), "
                    "or make fbank features first (melhubert-wav-to-fbank)"
                )
            try:
                waveform = load_audio(row.full_path, expected_samples=row.count)
            except (OSError, ValueError) as err:
                raise InputError(f"{row.where}: {err}") from None
            return self.reader.prepare_waveform(waveform)
        feat_dim = self.reader.feat_dim if self.reader is not None else None
        fbank = read_feature_file(row.full_path, row.where, feat_dim, row.count)
        if self.reader is not None:
            return self.reader.prepare(fbank)
        return stack_frames(np.asarray(fbank, dtype=np.float32), self.stack)

    @torch.no_grad()
    def states(self, inputs: Sequence[np.ndarray]) -> List[np.ndarray]:
        """Model inputs -> per utterance its (S, T, C) layer-normalised states, float32."""
        if self.name == FBANK:
            outputs = []
            for x in inputs:
                if x.ndim == 1:  # a waveform: the model's own front end gives its input frames
                    frames, _ = self.reader.model.waveform_to_frames(torch.from_numpy(x)[None].to(self.device), None)
                    x = frames[0].float().cpu().numpy()
                outputs.append(normalise_states(torch.tensor(x, dtype=torch.float32)[None]).numpy())
            return outputs
        per_utterance = self.reader.extract_batch(list(inputs))
        return [normalise_states(torch.from_numpy(np.stack(states))).numpy() for states in per_utterance]


def normalise_states(states: torch.Tensor) -> torch.Tensor:
    """(S, T, C) -> the same, each frame of each state normalised to zero mean and unit variance."""
    return F.layer_norm(states, states.shape[-1:])


def extract_probe_features(
    upstream: Upstream,
    rows: Sequence[ManifestRow],
    keep_frames: bool,
    keep_pooled: bool,
    max_batch_frames: int = 20000,
    dtype: str = "float32",
    progress: bool = True,
) -> ProbeFeatures:
    """Run ``upstream`` once over ``rows``; keep every frame (PR) and/or the per-utterance means (SID)."""
    frames: List[np.ndarray] = []
    pooled: List[np.ndarray] = []
    lengths: List[int] = []

    def consume(batch: List[np.ndarray]) -> None:
        for states in upstream.states(batch):
            lengths.append(states.shape[1])
            if keep_frames:
                frames.append(states.astype(dtype))
            if keep_pooled:
                pooled.append(states.mean(axis=1))

    pending: List[np.ndarray] = []
    longest = 0
    for row in with_progress(rows, desc=f"features ({upstream.name})", unit="utt", disable=not progress):
        x = upstream.model_input(row)
        size = upstream.reader.num_model_frames(x) if upstream.reader is not None else len(x)
        if pending and max(longest, size) * (len(pending) + 1) > max_batch_frames:
            consume(pending)
            pending, longest = [], 0
        pending.append(x)
        longest = max(longest, size)
    if pending:
        consume(pending)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return ProbeFeatures(
        upstream=upstream.name,
        num_states=upstream.num_states,
        offsets=offsets,
        frames=np.concatenate(frames, axis=1) if keep_frames else None,
        pooled=np.stack(pooled) if keep_pooled else None,
    )


def randomly_initialised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A fresh network of ``model``'s config, initialised from ``seed`` (global RNG untouched), holding
    nothing of ``model`` but its fbank statistics."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = MelHubertModel(model.cfg)
    fresh.fbank_mean_std.copy_(model.fbank_mean_std)
    device = next(model.parameters()).device
    return fresh.to(device).eval()


def load_upstream(
    name: str, checkpoint: Optional[str], device: str = "cpu", seed: int = 0, stack: int = 2,
    max_batch_frames: int = 20000,
) -> Upstream:
    """The upstream ``name`` (fbank, random init, pretrained) from ``checkpoint`` (optional for fbank)."""
    if checkpoint is None:
        return Upstream(name, None, stack=stack, device=device)
    reader = MelHubertFeatureReader(checkpoint, device=device, max_batch_frames=max_batch_frames)
    if name == RANDOM_INIT:
        reader.model = randomly_initialised(reader.model, seed)
    return Upstream(name, reader)


def audio_needs(rows: Sequence[ManifestRow]) -> bool:
    """Whether any row is audio (then a checkpoint must say how to normalise it)."""
    return any(row.kind == AUDIO for row in rows)

