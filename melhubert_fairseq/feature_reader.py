"""Hidden states of a trained ``mel_hubert`` checkpoint, for probing and stage-2 labelling."""
from __future__ import annotations

from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from fairseq import checkpoint_utils

from melhubert_fairseq.data.features import MeanStd, num_stacked_frames, stack_frames
from melhubert_fairseq.data.manifest import read_manifest


def load_mel_hubert(checkpoint_path: str, device: str = "cpu"):
    """Load a fairseq ``mel_hubert`` checkpoint (weights_only stays on) -> (model in eval mode, task cfg)."""
    models, cfg, _task = checkpoint_utils.load_model_ensemble_and_task([checkpoint_path])
    model = models[0].to(device).eval()
    return model, cfg.task


class MelHubertFeatureReader:
    """Runs a checkpoint over fbank frames exactly as training fed it (normalisation, stacking)."""

    def __init__(self, checkpoint_path: str, device: str = "cpu", max_batch_frames: int = 20000) -> None:
        self.model, self.task_cfg = load_mel_hubert(checkpoint_path, device)
        self.device = device
        self.max_batch_frames = max_batch_frames
        self.stack = int(self.task_cfg.stack_frames)
        self.feat_dim = int(self.task_cfg.feat_dim)
        self.frame_rate_hz = 100.0 / self.stack
        # Features in manifests are normalised on disk unless training normalised at
        # load time (task.mean_std_path); in that case the checkpoint holds the stats.
        stats = self.model.fbank_stats()
        self.load_time_stats: Optional[MeanStd] = None
        if self.task_cfg.mean_std_path:
            if stats is None:
                raise ValueError(f"{checkpoint_path}: trained with task.mean_std_path but holds no fbank stats")
            self.load_time_stats = MeanStd(stats[0].cpu().numpy(), stats[1].cpu().numpy())

    def prepare(self, fbank: np.ndarray) -> np.ndarray:
        """(frames, feat_dim) manifest features -> (model_frames, feat_dim * stack) model input."""
        if fbank.ndim != 2 or fbank.shape[1] != self.feat_dim:
            raise ValueError(f"expected (frames, {self.feat_dim}) fbank, got {fbank.shape}")
        feats = np.array(fbank, dtype=np.float32)  # copy: memory-mapped input is read-only
        if self.load_time_stats is not None:
            feats = self.load_time_stats.normalize(feats)
        return stack_frames(feats, self.stack)

    @torch.no_grad()
    def extract_batch(self, inputs: Sequence[np.ndarray], layer: Optional[int] = None) -> List[List[np.ndarray]]:
        """Model inputs (from :meth:`prepare`) -> per utterance, a list of every layer's (frames, C) output.

        With ``layer`` set, the model stops after that layer (1-based) and only
        layers 1..layer are returned.
        """
        lengths = [len(x) for x in inputs]
        batch = torch.zeros(len(inputs), max(lengths), inputs[0].shape[1])
        padding_mask = torch.ones(len(inputs), max(lengths), dtype=torch.bool)
        for row, x in enumerate(inputs):
            batch[row, : len(x)] = torch.from_numpy(x)
            padding_mask[row, : len(x)] = False
        out = self.model.extract_features(
            batch.to(self.device), padding_mask.to(self.device), mask=False, output_layer=layer
        )
        layers = [h.float().cpu().numpy() for h in out["layer_results"]]
        return [[h[row, :length] for h in layers] for row, length in enumerate(lengths)]

    def iter_manifest(
        self, manifest_path: str, layer: int, nshard: int = 1, rank: int = 0
    ) -> Iterator[Tuple[int, np.ndarray]]:
        """Yield (manifest row, layer ``layer`` states (model_frames, C)) for rows of shard ``rank``/``nshard``."""
        manifest = read_manifest(manifest_path)
        if not 1 <= layer <= len(self.model.encoder.layers):
            raise ValueError(f"layer must be in 1..{len(self.model.encoder.layers)}, got {layer}")
        rows = np.array_split(np.arange(len(manifest)), nshard)[rank]
        pending: List[Tuple[int, np.ndarray]] = []
        pending_frames = 0

        def flush():
            outputs = self.extract_batch([x for _, x in pending], layer=layer)
            for (row, _), per_layer in zip(pending, outputs):
                yield row, per_layer[layer - 1]

        for row in rows:
            path = manifest.full_path(row)
            fbank = np.load(path, mmap_mode="r", allow_pickle=False)
            if fbank.shape[0] != manifest.num_frames[row]:
                raise ValueError(
                    f"{manifest.describe(row)}: {path} has {fbank.shape[0]} frames, manifest says {manifest.num_frames[row]}"
                )
            model_input = self.prepare(fbank)
            frames = num_stacked_frames(int(fbank.shape[0]), self.stack)
            # Batch by padded size so one long utterance does not blow up memory.
            longest = max([frames] + [len(x) for _, x in pending])
            if pending and longest * (len(pending) + 1) > self.max_batch_frames:
                yield from flush()
                pending, pending_frames = [], 0
            pending.append((int(row), model_input))
            pending_frames += frames
        if pending:
            yield from flush()
