"""Feature sources: the frames k-means samples, fits and labels, one ``(manifest row, frames)`` pair at a time.

Stage 1 reads normalised 10 ms fbank frames (:class:`FbankSource`); stage 2
runs a trained ``mel_hubert`` checkpoint and takes one transformer layer's
hidden states, one frame per model frame (:class:`ModelLayerSource`). Both
check every matrix against the manifest's frame count, so sampling and
labelling never see frames that do not line up with the manifest.
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import Dict, Iterable, Iterator, Optional, Tuple

import numpy as np

from melhubert_fairseq.data.features import (
    FBANK_FRAME_RATE_HZ,
    MeanStd,
    check_feature_array,
    load_mean_std,
    num_stacked_frames,
    read_feature_file,
)
from melhubert_fairseq.data.frame_rates import label_stride
from melhubert_fairseq.data.manifest import FeatureManifest, read_manifest
from melhubert_fairseq.data.shards import shard_range
from melhubert_fairseq.errors import InputError

FeatureIterator = Iterator[Tuple[int, np.ndarray]]


class FeatureSource(ABC):
    """Frames of a manifest's rows; subclasses say what the frames are."""

    #: what the frames are, recorded in the k-means JSON sidecar
    kind: str
    #: frames per second the source yields (its labels' rate)
    frame_rate_hz: float
    manifest: FeatureManifest

    @abstractmethod
    def expected_frames(self, row: int) -> int:
        """Frames row ``row`` yields."""

    @abstractmethod
    def iter_rows(self, rows: Iterable[int]) -> FeatureIterator:
        """Yield ``(row, (frames, dim) float32)`` for ``rows`` in the given order."""

    @abstractmethod
    def describe(self) -> Dict[str, object]:
        """What the frames are, for the k-means JSON sidecar."""

    @abstractmethod
    def where(self, row: int) -> str:
        """Name row ``row`` in error messages."""

    def input_files(self) -> Iterator[str]:
        """Every file the source reads: its manifest, its own files (mean/std, checkpoint), each row's features."""
        yield self.manifest.path
        yield from self.own_files()
        for row in range(len(self.manifest)):
            yield self.manifest.full_path(row)

    @abstractmethod
    def own_files(self) -> Iterable[str]:
        """The files besides the manifest and its rows this source reads."""

    def iter_shard(self, nshard: int, rank: int) -> FeatureIterator:
        """Yield ``(row, frames)`` for every row of shard ``rank``, in manifest order."""
        start, end = shard_range(len(self.manifest), nshard, rank)
        return self.iter_rows(range(start, end))


class FbankSource(FeatureSource):
    """Normalised fbank frames of a manifest's ``.npy`` files (stage 1)."""

    kind = "fbank"
    frame_rate_hz = float(FBANK_FRAME_RATE_HZ)

    def __init__(self, manifest_path: str, mean_std_path: Optional[str] = None) -> None:
        self.manifest = read_manifest(manifest_path)
        self.mean_std_path = mean_std_path
        self.mean_std: Optional[MeanStd] = load_mean_std(mean_std_path) if mean_std_path else None

    def expected_frames(self, row: int) -> int:
        """Frames row ``row`` yields (the manifest's 10 ms count)."""
        return int(self.manifest.num_frames[row])

    def own_files(self) -> Iterable[str]:
        """``--mean-std``, if given."""
        return [self.mean_std_path] if self.mean_std_path else []

    def describe(self) -> Dict[str, object]:
        """What the frames are, for the k-means JSON sidecar."""
        return {
            "kind": self.kind,
            "manifest": os.path.abspath(self.manifest.path),
            "mean_std": os.path.abspath(self.mean_std_path) if self.mean_std_path else None,
            "frame_rate_hz": self.frame_rate_hz,
        }

    def load(self, row: int) -> np.ndarray:
        """Frames of row ``row`` as checked float32 (normalised with ``--mean-std`` when given)."""
        if self.mean_std is None:
            return read_feature_file(self.manifest.full_path(row), self.where(row), None, self.expected_frames(row))
        feats = read_feature_file(
            self.manifest.full_path(row), self.where(row), self.mean_std.dim, self.expected_frames(row),
            dim_name=f"the dim of the mean/std in {self.mean_std_path}",
        )
        return self.mean_std.normalize(feats)

    def iter_rows(self, rows: Iterable[int]) -> FeatureIterator:
        """Yield ``(row, frames)`` for ``rows`` in the given order."""
        for row in rows:
            yield int(row), self.load(int(row))

    def where(self, row: int) -> str:
        """Name row ``row`` in error messages: ``manifest:line (utterance)``."""
        return self.manifest.describe(row)


class ModelLayerSource(FeatureSource):
    """Hidden states of one transformer layer of a ``mel_hubert`` checkpoint (stage 2)."""

    kind = "mel_hubert_layer"

    def __init__(
        self,
        manifest_path: str,
        checkpoint_path: str,
        layer: int,
        device: str = "cpu",
        max_batch_frames: int = 20000,
    ) -> None:
        # Deferred: learn_kmeans and dump_km_labels import this module, and their --help must not import
        # fairseq or torch (which the feature reader does).
        from melhubert_fairseq.feature_reader import MelHubertFeatureReader

        if layer < 1:
            raise InputError(f"--layer is 1-based (transformer layer output), got {layer}")
        self.manifest = read_manifest(manifest_path)
        self.checkpoint_path = checkpoint_path
        self.layer = layer
        self.reader = MelHubertFeatureReader(
            checkpoint_path, device=device, max_batch_frames=max_batch_frames
        )
        self.frame_rate_hz = float(self.reader.frame_rate_hz)
        try:  # one label per model frame
            self.stack = label_stride(self.frame_rate_hz)
        except ValueError as err:
            raise InputError(f"{checkpoint_path}: model frame rate: {err}") from None

    def expected_frames(self, row: int) -> int:
        """Model frames of row ``row``: its 10 ms frames stacked by the model's stack factor."""
        return num_stacked_frames(int(self.manifest.num_frames[row]), self.stack)

    def own_files(self) -> Iterable[str]:
        """The checkpoint."""
        return [self.checkpoint_path]

    def describe(self) -> Dict[str, object]:
        """What the frames are, for the k-means JSON sidecar."""
        return {
            "kind": self.kind,
            "manifest": os.path.abspath(self.manifest.path),
            "checkpoint": os.path.abspath(self.checkpoint_path),
            "layer": self.layer,
            "frame_rate_hz": self.frame_rate_hz,
        }

    def where(self, row: int) -> str:
        """Name row ``row`` in error messages."""
        return f"layer {self.layer} of {self.checkpoint_path} on [{self.manifest.describe(row)}]"

    def iter_rows(self, rows: Iterable[int]) -> FeatureIterator:
        """Yield ``(row, hidden states)`` for ``rows`` in the given order (batched through the model)."""
        for row, states in self.reader.iter_manifest_rows(self.manifest, rows, [self.layer]):
            yield row, check_feature_array(
                states[0], self.where(row), "its output", expected_frames=self.expected_frames(row),
                frames_expected="{expected} were expected from the manifest",
            )


def add_feature_source_arguments(parser) -> None:
    """The flags that pick the features for :func:`feature_source_from_args` (fbank, or a checkpoint layer)."""
    parser.add_argument("--mean-std", help="mean-std.npy to normalise fbank with (default: features are already normalised)")
    parser.add_argument("--checkpoint", help="stage 2: mel_hubert checkpoint whose hidden states are the features")
    parser.add_argument("--layer", type=int, help="stage 2: 1-based transformer layer of --checkpoint")
    parser.add_argument("--device", default="cpu", help="torch device for the stage-2 model forward (dump_km_labels also computes distances there)")
    parser.add_argument("--max-batch-frames", type=int, default=20000, help="stage 2: model frames per forward batch")


def open_feature_source(
    manifest_path: str,
    mean_std_path: Optional[str] = None,
    checkpoint_path: Optional[str] = None,
    layer: Optional[int] = None,
    device: str = "cpu",
    max_batch_frames: int = 20000,
) -> FeatureSource:
    """Fbank frames, or a checkpoint layer's hidden states when ``checkpoint_path`` is given."""
    if checkpoint_path is None:
        if layer is not None:
            raise InputError("--layer needs --checkpoint (it selects a layer of that model)")
        return FbankSource(manifest_path, mean_std_path)
    if layer is None:
        raise InputError("--checkpoint needs --layer (which transformer layer's output to cluster)")
    if mean_std_path is not None:
        raise InputError(
            "--mean-std applies to fbank features only; the checkpoint normalises its input itself"
        )
    return ModelLayerSource(manifest_path, checkpoint_path, layer, device, max_batch_frames)


def feature_source_from_args(args) -> FeatureSource:
    """:func:`open_feature_source` for ``--manifest`` and the flags of :func:`add_feature_source_arguments`."""
    return open_feature_source(
        args.manifest, args.mean_std, args.checkpoint, args.layer, args.device, args.max_batch_frames
    )
