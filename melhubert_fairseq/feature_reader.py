"""Hidden states of a trained ``mel_hubert`` checkpoint, for probing, feature extraction and stage-2 labelling.

Python API::

    reader = MelHubertFeatureReader("checkpoint_best.pt")
    inputs = [reader.prepare_waveform(wav) for wav in waveforms]   # 16 kHz float audio
    # or reader.prepare(fbank) for features as they sit in a training manifest,
    # or reader.prepare_raw_fbank(fbank) for un-normalised 40-dim Kaldi fbank
    layers, padding_mask = reader.hidden_states(inputs)            # [(B, T, C)] * L, (B, T) True = padding

Everything the input needs (corpus mean/std for raw fbank and audio, frame
stacking) comes from the checkpoint itself.
"""
from __future__ import annotations

from typing import Iterable, Iterator, List, Optional, Sequence, Tuple, TypeVar

import numpy as np
import torch
from fairseq import checkpoint_utils

from melhubert_fairseq.data.fbank import FBANK_SAMPLE_RATE, compute_fbank
from melhubert_fairseq.data.features import MeanStd, read_feature_file, stack_frames
from melhubert_fairseq.data.manifest import read_manifest

Key = TypeVar("Key")


def load_mel_hubert(checkpoint_path: str, device: str = "cpu"):
    """Load a fairseq ``mel_hubert`` checkpoint (weights_only stays on) -> (model in eval mode, task cfg)."""
    models, cfg, _task = checkpoint_utils.load_model_ensemble_and_task([checkpoint_path])
    model = models[0].to(device).eval()
    return model, cfg.task


def parse_layers(spec: str, num_layers: int) -> List[int]:
    """``"all"`` or comma-separated 1-based layers (``"1,8,12"``) -> sorted unique layer numbers."""
    if spec.strip().lower() == "all":
        return list(range(1, num_layers + 1))
    try:
        layers = sorted({int(part) for part in spec.split(",") if part.strip()})
    except ValueError:
        raise ValueError(f"layers must be 'all' or comma-separated integers, got {spec!r}") from None
    bad = [layer for layer in layers if not 1 <= layer <= num_layers]
    if not layers or bad:
        raise ValueError(f"layers must be in 1..{num_layers} (the model has {num_layers}), got {spec!r}")
    return layers


class MelHubertFeatureReader:
    """Runs a checkpoint over fbank frames exactly as training fed it (normalisation, stacking)."""

    def __init__(self, checkpoint_path: str, device: str = "cpu", max_batch_frames: int = 20000) -> None:
        self.checkpoint_path = checkpoint_path
        self.model, self.task_cfg = load_mel_hubert(checkpoint_path, device)
        self.device = device
        self.max_batch_frames = max_batch_frames
        self.stack = int(self.task_cfg.stack_frames)
        self.feat_dim = int(self.task_cfg.feat_dim)
        self.frame_rate_hz = 100.0 / self.stack
        self.num_layers = len(self.model.encoder.layers)
        stats = self.model.fbank_stats()
        #: Corpus mean/std the model was trained with (None: the checkpoint does not know them).
        self.corpus_stats: Optional[MeanStd] = (
            MeanStd(stats[0].cpu().numpy(), stats[1].cpu().numpy(), f"{checkpoint_path} (fbank_mean_std)")
            if stats is not None
            else None
        )
        # Features in manifests are normalised on disk unless training normalised at
        # load time (task.mean_std_path); in that case the checkpoint holds the stats.
        self.load_time_stats: Optional[MeanStd] = None
        if self.task_cfg.mean_std_path:
            if self.corpus_stats is None:
                raise ValueError(f"{checkpoint_path}: trained with task.mean_std_path but holds no fbank stats")
            self.load_time_stats = self.corpus_stats

    def _check_fbank(self, fbank: np.ndarray) -> np.ndarray:
        """A float32 copy of a (frames, feat_dim) matrix (memory-mapped input is read-only)."""
        if fbank.ndim != 2 or fbank.shape[1] != self.feat_dim:
            raise ValueError(f"expected (frames, {self.feat_dim}) fbank, got {fbank.shape}")
        return np.array(fbank, dtype=np.float32)

    def prepare(self, fbank: np.ndarray) -> np.ndarray:
        """(frames, feat_dim) manifest features -> (model_frames, feat_dim * stack) model input."""
        feats = self._check_fbank(fbank)
        if self.load_time_stats is not None:
            feats = self.load_time_stats.normalize(feats)
        return stack_frames(feats, self.stack)

    def require_corpus_stats(self) -> MeanStd:
        """The checkpoint's corpus mean/std, or a clear error when it does not record them."""
        if self.corpus_stats is None:
            raise ValueError(
                f"{self.checkpoint_path} does not record the corpus mean/std its features were normalised with, "
                "so raw fbank or audio cannot be normalised: pass normalised features from a manifest instead, or "
                "store the stats in the checkpoint (melhubert-convert-original --mean-std FILE, or train with "
                "{task.data}/mean-std.npy present)"
            )
        return self.corpus_stats

    def prepare_raw_fbank(self, fbank: np.ndarray) -> np.ndarray:
        """Un-normalised (frames, 40) Kaldi fbank -> model input, normalised with the checkpoint's corpus stats."""
        stats = self.require_corpus_stats()
        return stack_frames(stats.normalize(self._check_fbank(fbank)), self.stack)

    def prepare_waveform(self, waveform: np.ndarray, sample_rate: int = FBANK_SAMPLE_RATE) -> np.ndarray:
        """Mono 16 kHz waveform (float in [-1, 1] or int16 scale) -> model input, as the original extractor."""
        return self.prepare_raw_fbank(compute_fbank(waveform, sample_rate))

    def collate(self, inputs: Sequence[np.ndarray]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Model inputs -> zero-padded (B, T, D) batch and its (B, T) padding mask (True = padding)."""
        if not inputs:
            raise ValueError("no inputs to collate")
        lengths = [len(x) for x in inputs]
        if min(lengths) == 0:
            raise ValueError(f"input {lengths.index(0)} has no frames")
        batch = torch.zeros(len(inputs), max(lengths), inputs[0].shape[1])
        padding_mask = torch.ones(len(inputs), max(lengths), dtype=torch.bool)
        for row, x in enumerate(inputs):
            batch[row, : len(x)] = torch.from_numpy(np.asarray(x, dtype=np.float32))
            padding_mask[row, : len(x)] = False
        return batch, padding_mask

    @torch.no_grad()
    def hidden_states(
        self, inputs: Sequence[np.ndarray], num_layers: Optional[int] = None
    ) -> Tuple[List[torch.Tensor], torch.Tensor]:
        """Model inputs -> (every layer's (B, T, C) output on CPU, (B, T) padding mask, True = padding).

        With ``num_layers`` the model stops after that layer (1-based) and only
        layers 1..num_layers are returned.
        """
        batch, padding_mask = self.collate(inputs)
        out = self.model.extract_features(
            batch.to(self.device), padding_mask.to(self.device), mask=False, output_layer=num_layers
        )
        return [h.float().cpu() for h in out["layer_results"]], padding_mask

    def extract_batch(self, inputs: Sequence[np.ndarray], layer: Optional[int] = None) -> List[List[np.ndarray]]:
        """Model inputs (from :meth:`prepare`) -> per utterance, a list of every layer's (frames, C) output.

        With ``layer`` set, the model stops after that layer (1-based) and only
        layers 1..layer are returned.
        """
        layers, _padding_mask = self.hidden_states(inputs, num_layers=layer)
        arrays = [h.numpy() for h in layers]
        return [[h[row, : len(x)] for h in arrays] for row, x in enumerate(inputs)]

    def iter_batched(
        self, items: Iterable[Tuple[Key, np.ndarray]], layers: Sequence[int]
    ) -> Iterator[Tuple[Key, List[np.ndarray]]]:
        """(key, model input) pairs -> (key, [(frames, C) output of each of ``layers``]), in input order.

        Utterances are batched up to ``max_batch_frames`` padded frames, so one
        long utterance does not blow up memory.
        """
        deepest = max(layers)
        pending: List[Tuple[Key, np.ndarray]] = []

        def flush():
            outputs = self.extract_batch([x for _, x in pending], layer=deepest)
            for (key, _), per_layer in zip(pending, outputs):
                yield key, [per_layer[layer - 1] for layer in layers]

        for key, model_input in items:
            longest = max([len(model_input)] + [len(x) for _, x in pending])
            if pending and longest * (len(pending) + 1) > self.max_batch_frames:
                yield from flush()
                pending = []
            pending.append((key, model_input))
        if pending:
            yield from flush()

    def iter_manifest_layers(
        self, manifest_path: str, layers: Sequence[int], nshard: int = 1, rank: int = 0
    ) -> Iterator[Tuple[int, List[np.ndarray]]]:
        """Yield (manifest row, [states of each of ``layers``]) for rows of shard ``rank``/``nshard``."""
        manifest = read_manifest(manifest_path)
        bad = [layer for layer in layers if not 1 <= layer <= self.num_layers]
        if not layers or bad:
            raise ValueError(f"layer must be in 1..{self.num_layers}, got {list(layers)}")
        rows = np.array_split(np.arange(len(manifest)), nshard)[rank]

        def model_inputs():
            for row in rows:
                fbank = read_feature_file(
                    manifest.full_path(row), manifest.describe(row), self.feat_dim, int(manifest.num_frames[row])
                )
                yield int(row), self.prepare(fbank)

        return self.iter_batched(model_inputs(), layers)

    def iter_manifest(
        self, manifest_path: str, layer: int, nshard: int = 1, rank: int = 0
    ) -> Iterator[Tuple[int, np.ndarray]]:
        """Yield (manifest row, layer ``layer`` states (model_frames, C)) for rows of shard ``rank``/``nshard``."""
        for row, states in self.iter_manifest_layers(manifest_path, [layer], nshard, rank):
            yield row, states[0]
