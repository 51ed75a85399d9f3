"""The pickle-free k-means files: centroids and frame samples as ``NAME.npy`` with a ``NAME.json`` sidecar.

A k-means model is ``NAME.npy`` (float32 centroids, shape (K, dim), read with
``allow_pickle=False``) and ``NAME.json`` (K, dim, feature source, inertia,
frames used, a SHA-256 of the centroids); a sample shard of ``learn_kmeans
--rank`` is the same pair holding frames. Neither file can run code when
loaded, unlike the joblib pickles of fairseq's ``simple_kmeans``
(:mod:`melhubert_fairseq.kmeans.fairseq_import` converts those).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Dict, Tuple

import numpy as np

from melhubert_fairseq.data.features import open_npy
from melhubert_fairseq.disk_full import save_npy, writing
from melhubert_fairseq.errors import InputError, check_regular_file
from melhubert_fairseq.file_formats import KMEANS_FORMAT, SAMPLE_FORMAT
from melhubert_fairseq.kmeans.sample import FrameSample
from melhubert_fairseq.output_guards import check_writable
from melhubert_fairseq.staged_outputs import StagedOutputs


def sidecar_path(npy_path: str) -> str:
    """The JSON sidecar next to a ``.npy`` array file (``km.npy`` -> ``km.json``)."""
    if not npy_path.endswith(".npy"):
        raise InputError(f"{npy_path}: k-means and sample files must end in .npy")
    return npy_path[: -len(".npy")] + ".json"


def array_sha256(array: np.ndarray) -> str:
    """SHA-256 of an array's bytes (ties a sidecar to its ``.npy``)."""
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def save_array_with_sidecar(
    npy_path: str, array: np.ndarray, metadata: Dict[str, object], overwrite: bool = False
) -> None:
    """Write ``array`` (``.npy``, no pickle) and ``metadata`` (JSON sidecar) as one staged pair."""
    json_path = sidecar_path(npy_path)
    metadata = dict(metadata, sha256=array_sha256(array))
    directory = os.path.dirname(os.path.abspath(npy_path))
    with StagedOutputs(os.path.basename(npy_path), [directory], overwrite) as staged:
        check_writable(npy_path, overwrite)
        check_writable(json_path, overwrite)
        save_npy(staged.path(npy_path), array)
        with writing(staged.path(json_path), "w") as handle:
            json.dump(metadata, handle, indent=2, sort_keys=True)
            handle.write("\n")
        staged.publish([json_path, npy_path])


def load_array_with_sidecar(npy_path: str, expected_format: str) -> Tuple[np.ndarray, Dict]:
    """Read an array and its JSON sidecar; check format, shape and checksum agree."""
    json_path = sidecar_path(npy_path)
    array = np.array(open_npy(npy_path))  # never unpickles
    try:
        with open(json_path, "r", encoding="utf-8") as handle:
            metadata = json.load(handle)
    except FileNotFoundError:
        raise FileNotFoundError(f"{json_path}: metadata sidecar of {npy_path} not found") from None
    except json.JSONDecodeError as err:
        raise InputError(f"{json_path}: not valid JSON ({err})") from None
    if not isinstance(metadata, dict) or metadata.get("format") != expected_format:
        raise InputError(f"{json_path}: not a {expected_format} sidecar")
    if array.ndim != 2 or array.dtype != np.float32:
        raise InputError(f"{npy_path}: expected a float32 (rows, dim) array, got {array.dtype} {array.shape}")
    if metadata.get("sha256") != array_sha256(array):
        raise InputError(f"{json_path}: checksum does not match {npy_path} (files from different runs?)")
    return array, metadata


@dataclass
class KMeansModel:
    """Centroids (K, dim) float32 and the metadata of their JSON sidecar."""

    centroids: np.ndarray
    metadata: Dict[str, object]

    @property
    def num_clusters(self) -> int:
        """K, the number of clusters."""
        return int(self.centroids.shape[0])

    @property
    def dim(self) -> int:
        """Dimension of the clustered features."""
        return int(self.centroids.shape[1])


def save_kmeans(path: str, model: KMeansModel, overwrite: bool = False) -> None:
    """Write ``path`` (centroids ``.npy``) and its JSON sidecar atomically."""
    metadata = dict(
        model.metadata, format=KMEANS_FORMAT, num_clusters=model.num_clusters, dim=model.dim
    )
    save_array_with_sidecar(path, np.ascontiguousarray(model.centroids, np.float32), metadata, overwrite)


def load_kmeans(path: str) -> KMeansModel:
    """Load centroids saved by :func:`save_kmeans` (never unpickles anything)."""
    if not path.endswith(".npy"):
        check_regular_file(path, what="k-means model")
        raise InputError(
            f"{path}: not a k-means model of melhubert-learn-kmeans (NAME.npy centroids with a NAME.json "
            "sidecar); for a fairseq simple_kmeans (joblib) model, run melhubert-import-kmeans --trust-pickle first"
        )
    centroids, metadata = load_array_with_sidecar(path, KMEANS_FORMAT)
    if metadata.get("num_clusters") != centroids.shape[0] or metadata.get("dim") != centroids.shape[1]:
        raise InputError(
            f"{sidecar_path(path)}: says K={metadata.get('num_clusters')}, dim={metadata.get('dim')} "
            f"but {path} holds {centroids.shape}"
        )
    if not np.isfinite(centroids).all():
        raise InputError(f"{path}: centroids contain NaN or Inf")
    return KMeansModel(centroids, metadata)


def save_sample(path: str, sample: FrameSample, metadata: Dict[str, object], overwrite: bool) -> None:
    """Write one shard's sampled frames (``.npy``) with a JSON sidecar."""
    metadata = dict(
        metadata,
        format=SAMPLE_FORMAT,
        frames=int(sample.frames.shape[0]),
        dim=int(sample.frames.shape[1]),
        utterances=sample.utterances,
        source_frames=sample.source_frames,
    )
    save_array_with_sidecar(path, sample.frames, metadata, overwrite)


def load_sample(path: str) -> Tuple[FrameSample, Dict]:
    """Read one shard's sampled frames written by :func:`save_sample`."""
    frames, metadata = load_array_with_sidecar(path, SAMPLE_FORMAT)
    return FrameSample(frames, int(metadata["utterances"]), int(metadata["source_frames"])), metadata

