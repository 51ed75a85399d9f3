"""Hidden states of a trained ``mel_hubert`` checkpoint, for probing, feature extraction and stage-2 labelling.

Python API::

    reader = MelHubertFeatureReader("checkpoint_best.pt")
    inputs = [reader.prepare_waveform(wav) for wav in waveforms]   # 16 kHz float audio
    # or reader.prepare(fbank) for features as they sit in a training manifest,
    # or reader.prepare_raw_fbank(fbank) for un-normalised 40-dim Kaldi fbank
    states, padding_mask = reader.hidden_states(inputs)            # [(B, T, C)] * (L + 1), (B, T) True = padding

``states[k]`` is layer k's output; ``states[0]`` is the input of the first
transformer layer (projected frames + positional conv, after the encoder's
LayerNorm). Waveforms go through the model's own torch front end
(:class:`~melhubert_fairseq.models.waveform_frontend.WaveformFrontEnd`), batched
on the reader's device. Everything the input needs (corpus mean/std for raw
fbank and audio, frame stacking) comes from the checkpoint itself.
"""
from __future__ import annotations

from typing import Iterable, Iterator, List, Optional, Sequence, Tuple, TypeVar

import numpy as np
import torch
from fairseq import checkpoint_utils

from melhubert_fairseq import register_with_fairseq
from melhubert_fairseq.checkpoint_loading import load_fairseq_state, require_mel_hubert
from melhubert_fairseq.data.fbank import check_audio
from melhubert_fairseq.data.features import FBANK_FRAME_RATE_HZ, FBANK_SAMPLE_RATE, INT16_SCALE, MeanStd, read_feature_file, stack_frames
from melhubert_fairseq.data.manifest import FeatureManifest, read_manifest
from melhubert_fairseq.data.shards import shard_range
from melhubert_fairseq.errors import InputError
from melhubert_fairseq.models.waveform_frontend import check_sample_rate, check_waveform, collate_waveforms

Key = TypeVar("Key")


def load_mel_hubert(checkpoint_path: str, device: str = "cpu"):
    """Load a fairseq ``mel_hubert`` checkpoint (weights_only stays on) -> (model in eval mode, task cfg)."""
    # Named before fairseq builds anything: another model's task would look for its own data first.
    require_mel_hubert(checkpoint_path, load_fairseq_state(checkpoint_path, mmap=True), "its features are not Mel-HuBERT's")
    register_with_fairseq()  # fairseq rebuilds the task and model by their registered names
    models, cfg, _task = checkpoint_utils.load_model_ensemble_and_task([checkpoint_path])
    model = models[0].to(device).eval()
    return model, cfg.task


def parse_layers(spec: str, num_layers: int) -> List[int]:
    """Comma-separated layer numbers and/or ``all`` -> sorted unique layers in 0..num_layers.

    Layer k >= 1 is transformer layer k's output, layer 0 the input of the first
    layer; ``all`` stands for 1..num_layers (as before layer 0 existed), so
    ``"0,all"`` is every hidden state.
    """
    layers = set()
    for part in (part.strip().lower() for part in spec.split(",")):
        if part == "all":
            layers.update(range(1, num_layers + 1))
        elif part:
            try:
                layers.add(int(part))
            except ValueError:
                raise InputError(f"layers must be 'all' and/or comma-separated integers, got {spec!r}") from None
    bad = [layer for layer in layers if not 0 <= layer <= num_layers]
    if not layers or bad:
        raise InputError(
            f"layers must be in 0..{num_layers} (0 = input of the first layer; the model has {num_layers}), "
            f"got {spec!r}"
        )
    return sorted(layers)


class MelHubertFeatureReader:
    """Runs a checkpoint over fbank frames exactly as training fed it (normalisation, stacking), or over audio."""

    def __init__(self, checkpoint_path: str, device: str = "cpu", max_batch_frames: int = 20000) -> None:
        model, task_cfg = load_mel_hubert(checkpoint_path, device)
        self._setup(checkpoint_path, model, task_cfg, device, max_batch_frames)

    @classmethod
    def for_model(
        cls, model, task_cfg, device: str = "cpu", max_batch_frames: int = 20000, name: str = "the model being trained"
    ) -> "MelHubertFeatureReader":
        """A reader of a ``mel_hubert`` model already in memory (its task config says how it reads features);
        ``name`` stands for the checkpoint path in messages."""
        reader = cls.__new__(cls)
        reader._setup(name, model, task_cfg, device, max_batch_frames)
        return reader

    def _setup(self, checkpoint_path: str, model, task_cfg, device: str, max_batch_frames: int) -> None:
        self.checkpoint_path = checkpoint_path
        self.model, self.task_cfg = model, task_cfg
        self.device = device
        self.max_batch_frames = max_batch_frames
        self.stack = int(self.task_cfg.stack_frames)
        self.feat_dim = int(self.task_cfg.feat_dim)
        self.frame_rate_hz = FBANK_FRAME_RATE_HZ / self.stack
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
                raise InputError(f"{checkpoint_path}: trained with task.mean_std_path but holds no fbank stats")
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
        self.model.require_fbank_stats(self.checkpoint_path)
        return self.corpus_stats

    def prepare_raw_fbank(self, fbank: np.ndarray) -> np.ndarray:
        """Un-normalised (frames, 40) Kaldi fbank -> model input, normalised with the checkpoint's corpus stats."""
        stats = self.require_corpus_stats()
        return stack_frames(stats.normalize(self._check_fbank(fbank)), self.stack)

    def prepare_waveform(self, waveform: np.ndarray, sample_rate: int = FBANK_SAMPLE_RATE) -> np.ndarray:
        """Mono 16 kHz waveform (float in [-1, 1], or integers on the int16 scale) -> (samples,) float32 model input.

        The model computes its fbank from it (:meth:`hidden_states`); an error if
        the checkpoint cannot normalise audio, the rate is not 16 kHz, the
        array is not a 1-D float/integer waveform, or it is empty or holds NaN/Inf.
        """
        self.require_corpus_stats()
        check_sample_rate(sample_rate, "waveform")
        waveform = np.asarray(waveform)
        if np.issubdtype(waveform.dtype, np.integer):
            waveform = waveform.astype(np.float32) / INT16_SCALE  # exact: the front end scales by 2**15 again
        check_waveform(waveform, "waveform", dims=(1,))
        check_audio(waveform, "waveform")
        return np.asarray(waveform, dtype=np.float32)

    def num_model_frames(self, model_input: np.ndarray) -> int:
        """Model frames an input gives: its rows for frames, ceil(fbank frames / stack) for a waveform."""
        if model_input.ndim == 2:
            return len(model_input)
        return int(self.model.waveform_frontend.num_frames(torch.tensor(len(model_input))))

    def collate(self, inputs: Sequence[np.ndarray]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Model inputs -> zero-padded batch and padding mask (True = padding): (B, T, D) and (B, T) for
        frames, (B, samples) and (B, samples) for waveforms (from :meth:`prepare_waveform`)."""
        if not inputs:
            raise ValueError("no inputs to collate")
        kinds = {np.ndim(x) for x in inputs}
        if kinds == {1}:
            return collate_waveforms([torch.from_numpy(np.asarray(x, dtype=np.float32)) for x in inputs])
        if kinds != {2}:
            raise ValueError(f"a batch must be all frames (2-D) or all waveforms (1-D), got dims {sorted(kinds)}")
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
        """Model inputs -> (hidden states (B, T, C) on CPU, index = layer number, 0 = input of the first layer;
        (B, T) frame padding mask, True = padding).

        With ``num_layers`` the model stops after that layer and only states
        0..num_layers are returned.
        """
        batch, padding_mask = self.collate(inputs)
        out = self.model.extract_features(
            batch.to(self.device), padding_mask.to(self.device), mask=False, output_layer=num_layers
        )
        return [h.float().cpu() for h in out["hidden_states"]], out["padding_mask"].cpu()

    def extract_batch(self, inputs: Sequence[np.ndarray], layer: Optional[int] = None) -> List[List[np.ndarray]]:
        """Model inputs (from :meth:`prepare` or :meth:`prepare_waveform`) -> per utterance, its (frames, C)
        hidden states, index = layer number (0 = input of the first layer).

        With ``layer`` set, the model stops after that layer and only states
        0..layer are returned.
        """
        states, padding_mask = self.hidden_states(inputs, num_layers=layer)
        arrays = [h.numpy() for h in states]
        lengths = (~padding_mask).sum(dim=1).tolist()
        return [[h[row, :length] for h in arrays] for row, length in enumerate(lengths)]

    def iter_batched(
        self, items: Iterable[Tuple[Key, np.ndarray]], layers: Sequence[int]
    ) -> Iterator[Tuple[Key, List[np.ndarray]]]:
        """(key, model input) pairs -> (key, [(frames, C) state of each of ``layers``]), in input order.

        Utterances are batched up to ``max_batch_frames`` padded model frames, so
        one long utterance does not blow up memory.
        """
        deepest = max(layers)
        pending: List[Tuple[Key, np.ndarray]] = []
        longest = 0

        def flush():
            outputs = self.extract_batch([x for _, x in pending], layer=deepest)
            for (key, _), per_layer in zip(pending, outputs):
                yield key, [per_layer[layer] for layer in layers]

        for key, model_input in items:
            frames = self.num_model_frames(model_input)
            if pending and max(longest, frames) * (len(pending) + 1) > self.max_batch_frames:
                yield from flush()
                pending, longest = [], 0
            pending.append((key, model_input))
            longest = max(longest, frames)
        if pending:
            yield from flush()

    def iter_manifest_rows(
        self, manifest: FeatureManifest, rows: Iterable[int], layers: Sequence[int]
    ) -> Iterator[Tuple[int, List[np.ndarray]]]:
        """Yield (row, [states of each of ``layers``]) for the ``rows`` of a read manifest, in their order."""
        bad = [layer for layer in layers if not 0 <= layer <= self.num_layers]
        if not layers or bad:
            raise InputError(f"layer must be in 0..{self.num_layers} (0 = input of the first layer), got {list(layers)}")

        def model_inputs():
            for row in rows:
                fbank = read_feature_file(
                    manifest.full_path(row), manifest.describe(row), self.feat_dim, int(manifest.num_frames[row])
                )
                yield int(row), self.prepare(fbank)

        return self.iter_batched(model_inputs(), layers)

    def iter_manifest_layers(
        self, manifest_path: str, layers: Sequence[int], nshard: int = 1, rank: int = 0
    ) -> Iterator[Tuple[int, List[np.ndarray]]]:
        """Yield (manifest row, [states of each of ``layers``]) for rows of shard ``rank``/``nshard``."""
        manifest = read_manifest(manifest_path)
        return self.iter_manifest_rows(manifest, range(*shard_range(len(manifest), nshard, rank)), layers)

    def iter_manifest(
        self, manifest_path: str, layer: int, nshard: int = 1, rank: int = 0
    ) -> Iterator[Tuple[int, np.ndarray]]:
        """Yield (manifest row, layer ``layer`` states (model_frames, C)) for rows of shard ``rank``/``nshard``."""
        for row, states in self.iter_manifest_layers(manifest_path, [layer], nshard, rank):
            yield row, states[0]
