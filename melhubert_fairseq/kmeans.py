"""K-means targets for Mel-HuBERT: frame sampling, fitting, safe centroid files, label assignment.

Stage 1 clusters normalised 10 ms fbank frames; stage 2 clusters the hidden
states of one transformer layer of a trained ``mel_hubert`` checkpoint (one
frame per model frame). Both go through a *feature source* that yields
``(manifest_row, frames)`` for the rows of a shard, so sampling, fitting and
labelling are the same code for either stage.

A k-means model is stored as two files: ``NAME.npy`` (float32 centroids,
shape (K, dim), loaded with ``allow_pickle=False``) and ``NAME.json``
(K, dim, feature source, inertia, frames used, a SHA-256 of the centroids).
Neither file can run code when loaded, unlike the joblib pickles of
fairseq's ``simple_kmeans``.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from melhubert_fairseq.atomic_output import StagedOutputs, check_writable
from melhubert_fairseq.cli import with_progress
from melhubert_fairseq.data.features import (
    FBANK_FRAME_RATE_HZ,
    MeanStd,
    check_feature_array,
    load_mean_std,
    num_stacked_frames,
    open_npy,
    read_feature_file,
)
from melhubert_fairseq.data.manifest import read_manifest, write_manifest

KMEANS_FORMAT = "melhubert-kmeans-v1"
SAMPLE_FORMAT = "melhubert-kmeans-sample-v1"
#: faiss is the default: in benchmarks/bench_kmeans.py it fits faster than
#: scikit-learn's MiniBatchKMeans and reaches a lower held-out inertia.
DEFAULT_BACKEND = "faiss"
BACKENDS = ("faiss", "sklearn")
#: Lloyd iterations for faiss; epochs over the sample for MiniBatchKMeans
#: (fairseq's simple_kmeans default, usually cut short by early stopping).
DEFAULT_ITERATIONS = {"faiss": 25, "sklearn": 100}

FeatureIterator = Iterator[Tuple[int, np.ndarray]]


# --------------------------------------------------------------------------- shards
def shard_range(total: int, nshard: int, rank: int) -> Tuple[int, int]:
    """Rows ``[start, end)`` of shard ``rank`` of ``nshard``: ``np.array_split``'s contiguous split.

    The same split as ``MelHubertFeatureReader.iter_manifest``, so fbank and
    checkpoint sources shard a manifest identically.
    """
    if nshard < 1:
        raise ValueError(f"--nshard must be >= 1, got {nshard}")
    if not 0 <= rank < nshard:
        raise ValueError(f"--rank must be in [0, {nshard - 1}], got {rank}")
    if nshard > total:
        raise ValueError(f"--nshard {nshard} is larger than the number of utterances ({total})")
    base, extra = divmod(total, nshard)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard_file_name(split: str, rank: int, nshard: int, suffix: str) -> str:
    """``{split}_{rank}_{nshard}{suffix}``, or ``{split}{suffix}`` when unsharded."""
    return f"{split}{suffix}" if nshard == 1 else f"{split}_{rank}_{nshard}{suffix}"


def split_name(manifest_path: str) -> str:
    """The split a manifest holds: its file name without ``.tsv`` (``train.tsv`` -> ``train``)."""
    return os.path.splitext(os.path.basename(manifest_path))[0]


# --------------------------------------------------------------------------- feature sources
class FbankSource:
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

    def iter_rows(self, rows: Sequence[int]) -> FeatureIterator:
        """Yield ``(row, frames)`` for ``rows`` in the given order."""
        for row in rows:
            yield int(row), self.load(int(row))

    def iter_shard(self, nshard: int, rank: int) -> FeatureIterator:
        """Yield ``(row, frames)`` for every row of shard ``rank``, in manifest order."""
        start, end = shard_range(len(self.manifest), nshard, rank)
        return self.iter_rows(range(start, end))

    def where(self, row: int) -> str:
        """Name row ``row`` in error messages: ``manifest:line (utterance)``."""
        return self.manifest.describe(row)


class ModelLayerSource:
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
        from melhubert_fairseq.feature_reader import MelHubertFeatureReader

        if layer < 1:
            raise ValueError(f"--layer is 1-based (transformer layer output), got {layer}")
        self.manifest = read_manifest(manifest_path)
        self.manifest_path = manifest_path
        self.checkpoint_path = checkpoint_path
        self.layer = layer
        self.reader = MelHubertFeatureReader(
            checkpoint_path, device=device, max_batch_frames=max_batch_frames
        )
        self.frame_rate_hz = float(self.reader.frame_rate_hz)
        stack = FBANK_FRAME_RATE_HZ / self.frame_rate_hz
        if abs(stack - round(stack)) > 1e-6 or round(stack) < 1:
            raise ValueError(
                f"{checkpoint_path}: model frame rate {self.frame_rate_hz} Hz is not 100 Hz / an integer"
            )
        self.stack = int(round(stack))

    def expected_frames(self, row: int) -> int:
        """Model frames of row ``row``: its 10 ms frames stacked by the model's stack factor."""
        return num_stacked_frames(int(self.manifest.num_frames[row]), self.stack)

    def describe(self) -> Dict[str, object]:
        """What the frames are, for the k-means JSON sidecar."""
        return {
            "kind": self.kind,
            "manifest": os.path.abspath(self.manifest_path),
            "checkpoint": os.path.abspath(self.checkpoint_path),
            "layer": self.layer,
            "frame_rate_hz": self.frame_rate_hz,
        }

    def where(self, row: int) -> str:
        """Name row ``row`` in error messages."""
        return f"layer {self.layer} of {self.checkpoint_path} on [{self.manifest.describe(row)}]"

    def _checked(self, pairs: Iterable[Tuple[int, np.ndarray]], rows: Sequence[int]) -> FeatureIterator:
        """Check the reader yields exactly ``rows`` in order, with the expected frame counts."""
        position = 0
        for row, feats in pairs:
            if position >= len(rows) or row != rows[position]:
                expected = rows[position] if position < len(rows) else "nothing more"
                raise RuntimeError(
                    f"{self.checkpoint_path}: feature reader yielded manifest row {row}, expected {expected}"
                )
            yield row, check_feature_array(
                feats, self.where(row), "its output", expected_frames=self.expected_frames(row),
                frames_expected="{expected} were expected from the manifest",
            )
            position += 1
        if position != len(rows):
            raise RuntimeError(
                f"{self.checkpoint_path}: feature reader stopped after {position} of {len(rows)} utterances"
            )

    def iter_rows(self, rows: Sequence[int]) -> FeatureIterator:
        """Yield ``(row, hidden states)`` for ``rows`` (sorted), via a temporary sub-manifest."""
        rows = [int(r) for r in rows]
        with tempfile.TemporaryDirectory(prefix="km_rows_") as tmp:
            sub_path = os.path.join(tmp, "rows.tsv")
            write_manifest(
                sub_path,
                self.manifest.root,
                ((self.manifest.relative_path(r), int(self.manifest.num_frames[r])) for r in rows),
            )
            pairs = ((rows[i], feats) for i, feats in self.reader.iter_manifest(sub_path, self.layer))
            yield from self._checked(pairs, rows)

    def iter_shard(self, nshard: int, rank: int) -> FeatureIterator:
        """Yield ``(row, hidden states)`` for every row of shard ``rank``, in manifest order."""
        start, end = shard_range(len(self.manifest), nshard, rank)
        pairs = self.reader.iter_manifest(self.manifest_path, self.layer, nshard=nshard, rank=rank)
        return self._checked(pairs, list(range(start, end)))


def add_feature_source_arguments(parser) -> None:
    """The flags that pick the features for :func:`open_feature_source` (fbank, or a checkpoint layer)."""
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
):
    """Fbank frames, or a checkpoint layer's hidden states when ``checkpoint_path`` is given."""
    if checkpoint_path is None:
        if layer is not None:
            raise ValueError("--layer needs --checkpoint (it selects a layer of that model)")
        return FbankSource(manifest_path, mean_std_path)
    if layer is None:
        raise ValueError("--checkpoint needs --layer (which transformer layer's output to cluster)")
    if mean_std_path is not None:
        raise ValueError(
            "--mean-std applies to fbank features only; the checkpoint normalises its input itself"
        )
    return ModelLayerSource(manifest_path, checkpoint_path, layer, device, max_batch_frames)


# --------------------------------------------------------------------------- sampling
def choose_sample_rows(
    num_frames: np.ndarray, sample_frac: float, rng: np.random.Generator
) -> np.ndarray:
    """Random whole utterances (sorted positions) holding about ``sample_frac`` of the frames."""
    if not 0 < sample_frac <= 1:
        raise ValueError(f"--sample-frac must be in (0, 1], got {sample_frac}")
    if sample_frac >= 1:
        return np.arange(len(num_frames))
    order = rng.permutation(len(num_frames))
    covered = np.cumsum(num_frames[order])
    # Whole utterances keep file reads (and, in stage 2, model forwards) to the sample.
    take = int(np.searchsorted(covered, sample_frac * covered[-1])) + 1
    return np.sort(order[:take])


@dataclass
class FrameSample:
    """Frames sampled for fitting k-means, with where they came from."""

    frames: np.ndarray  # (n, dim) float32
    utterances: int
    source_frames: int  # frames of the sampled utterances before frame subsampling


def sample_frames(
    source,
    nshard: int = 1,
    rank: int = 0,
    sample_frac: float = 0.1,
    max_frames: Optional[int] = None,
    seed: int = 0,
    progress: bool = True,
) -> FrameSample:
    """Sample frames of shard ``rank``: random whole utterances, then at most ``max_frames`` of their frames."""
    start, end = shard_range(len(source.manifest), nshard, rank)
    rng = np.random.default_rng([seed, rank, nshard])
    rows = start + choose_sample_rows(source.manifest.num_frames[start:end], sample_frac, rng)
    expected = np.asarray([source.expected_frames(int(r)) for r in rows], dtype=np.int64)
    expected_total = int(expected.sum())
    keep = None
    if max_frames and expected_total > max_frames:
        # Choose the kept frames up front (exactly max_frames, spread over every sampled
        # utterance) so memory stays at max_frames however large the sample is.
        keep = np.sort(rng.choice(expected_total, max_frames, replace=False))
        utterance_starts = np.concatenate([[0], np.cumsum(expected)])
        keep_bounds = np.searchsorted(keep, utterance_starts)
    kept: List[np.ndarray] = []
    dim = None
    seen = 0
    for position, (row, feats) in enumerate(with_progress(
        source.iter_rows(rows), total=len(rows), desc=f"sample shard {rank}/{nshard}",
        unit="utt", disable=not progress,
    )):
        if dim is None:
            dim = feats.shape[1]
        elif feats.shape[1] != dim:
            raise ValueError(
                f"{source.where(row)}: feature dim {feats.shape[1]} differs from the {dim} of earlier utterances"
            )
        seen += feats.shape[0]  # sources check each utterance has its expected frame count
        if keep is not None:
            lo, hi = keep_bounds[position], keep_bounds[position + 1]
            feats = feats[keep[lo:hi] - utterance_starts[position]]
        kept.append(feats)
    frames = np.concatenate(kept, axis=0)
    return FrameSample(np.ascontiguousarray(frames), len(rows), seen)


# --------------------------------------------------------------------------- fitting
def fit_kmeans(
    frames: np.ndarray,
    num_clusters: int,
    backend: str = DEFAULT_BACKEND,
    seed: int = 0,
    iterations: Optional[int] = None,
    init: str = "k-means++",
    batch_size: int = 10000,
    threads: Optional[int] = None,
) -> np.ndarray:
    """Fit k-means on ``frames`` (n, dim); return float32 centroids (num_clusters, dim).

    ``init`` is ``"k-means++"`` (both backends) or ``"random"`` (faiss' own
    initialisation: random frames, which can leave clusters merged).
    ``threads`` caps the OpenMP/BLAS threads of faiss and scikit-learn.
    """
    frames = np.ascontiguousarray(frames, dtype=np.float32)
    if frames.ndim != 2 or frames.shape[0] == 0:
        raise ValueError(f"need a non-empty (frames, dim) matrix to fit k-means, got {frames.shape}")
    if num_clusters < 1:
        raise ValueError(f"--num-clusters must be >= 1, got {num_clusters}")
    if num_clusters > frames.shape[0]:
        raise ValueError(
            f"--num-clusters {num_clusters} is larger than the {frames.shape[0]} sampled frames; "
            "raise --sample-frac/--max-frames or lower --num-clusters"
        )
    if backend not in BACKENDS:
        raise ValueError(f"unknown k-means backend {backend!r}; choose one of {BACKENDS}")
    iterations = DEFAULT_ITERATIONS[backend] if iterations is None else iterations
    if init not in ("k-means++", "random"):
        raise ValueError(f"unknown k-means init {init!r}; choose 'k-means++' or 'random'")
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=threads):  # None: leave the libraries' defaults
        fit = _fit_faiss if backend == "faiss" else _fit_sklearn
        centroids = fit(frames, num_clusters, seed, iterations, init, batch_size)
    return np.ascontiguousarray(centroids, dtype=np.float32)


def _fit_faiss(frames, num_clusters, seed, iterations, init, batch_size) -> np.ndarray:
    """faiss Lloyd iterations over all of ``frames`` (``batch_size`` is unused)."""
    import logging

    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # it logs its CPU probing
    import faiss

    kmeans = faiss.Kmeans(
        frames.shape[1],
        num_clusters,
        niter=iterations,
        seed=seed,
        # faiss silently subsamples to 256 points per centroid by default;
        # the caller already chose the sample size, so use all of it.
        max_points_per_centroid=math.ceil(frames.shape[0] / num_clusters) + 1,
        min_points_per_centroid=1,
        verbose=False,
    )
    init_centroids = None
    if init == "k-means++":
        init_centroids = kmeans_plusplus_init(frames, num_clusters, seed)
    kmeans.train(frames, init_centroids=init_centroids)
    return kmeans.centroids


def _fit_sklearn(frames, num_clusters, seed, iterations, init, batch_size) -> np.ndarray:
    """scikit-learn MiniBatchKMeans with fairseq simple_kmeans' settings."""
    from sklearn.cluster import MiniBatchKMeans

    # fairseq simple_kmeans' settings (HuBERT's labels were made with these).
    kmeans = MiniBatchKMeans(
        n_clusters=num_clusters,
        init=init,
        max_iter=iterations,
        batch_size=batch_size,
        compute_labels=False,
        tol=0.0,
        max_no_improvement=100,
        n_init=20,
        reassignment_ratio=0.0,
        random_state=seed,
    )
    kmeans.fit(frames)
    return kmeans.cluster_centers_


def kmeans_plusplus_init(
    frames: np.ndarray, num_clusters: int, seed: int, max_points: Optional[int] = None
) -> np.ndarray:
    """k-means++ seeds (scikit-learn's) drawn from at most ``max(20000, 40 K)`` random frames."""
    from sklearn.cluster import kmeans_plusplus

    rng = np.random.default_rng(seed)
    # Seeding costs O(points * K * dim) and dominated the fit on all 300k frames; on
    # 20k frames it is ~10x faster with the same held-out inertia (measured, K=512).
    max_points = max(20_000, 40 * num_clusters) if max_points is None else max_points
    if frames.shape[0] > max_points:
        frames = frames[np.sort(rng.choice(frames.shape[0], max_points, replace=False))]
    centres, _ = kmeans_plusplus(frames, num_clusters, random_state=int(rng.integers(2**31 - 1)))
    return np.ascontiguousarray(centres, dtype=np.float32)


# --------------------------------------------------------------------------- assignment
class KMeansAssigner:
    """Nearest-centroid labels via chunked ``||x||^2 - 2 x.c + ||c||^2`` matmuls (torch).

    On CPU, blocks of ``cpu_chunk_frames`` go to a thread pool, each block's
    matmul single-threaded: the distance block stays in cache, and it ran
    2-3.5x faster than torch's own multi-threaded matmul over 16k-frame blocks
    (benchmarks/bench_kmeans.py, 2 shared cores). On a GPU, big chunks.
    """

    def __init__(
        self,
        centroids: np.ndarray,
        device: str = "cpu",
        chunk_frames: int = 16384,
        cpu_chunk_frames: int = 512,
        threads: Optional[int] = None,
    ) -> None:
        import torch  # here, not at the top: the k-means tools' --help and sampling need no torch

        centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        self.num_clusters, self.dim = centroids.shape
        self.device = torch.device(device)
        self.centroids_t = torch.from_numpy(centroids).to(self.device).t().contiguous()
        self.centroid_sq = (torch.from_numpy(centroids).double() ** 2).sum(dim=1).float().to(self.device)
        on_cpu = self.device.type == "cpu"
        #: frames buffered before one assignment pass (bounds memory per pass)
        self.chunk_frames = chunk_frames
        self.block_frames = cpu_chunk_frames if on_cpu else chunk_frames
        self.threads = (threads or torch.get_num_threads()) if on_cpu else 1

    def _assign_block(
        self, frames: np.ndarray, labels: np.ndarray, sq_dist: Optional[np.ndarray], start: int
    ) -> None:
        """Label rows ``[start, start + block_frames)`` into ``labels`` (and ``sq_dist``)."""
        import torch

        end = min(start + self.block_frames, frames.shape[0])
        with torch.no_grad():
            x = torch.from_numpy(frames[start:end]).to(self.device)
            # ||c||^2 - 2 x.c in one fused addmm; ||x||^2 does not change the argmin.
            partial = torch.addmm(self.centroid_sq, x, self.centroids_t, alpha=-2.0)
            if sq_dist is None:
                labels[start:end] = partial.argmin(dim=1).cpu().numpy()
                return
            best, index = partial.min(dim=1)
            labels[start:end] = index.cpu().numpy()
            sq_dist[start:end] = (best + (x * x).sum(dim=1)).clamp_(min=0).cpu().numpy()

    def _run(self, frames: np.ndarray, with_distance: bool) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """Label all rows of ``frames``, block by block (in a thread pool on CPU)."""
        frames = np.ascontiguousarray(frames, dtype=np.float32)
        if frames.ndim != 2 or frames.shape[1] != self.dim:
            raise ValueError(f"expected (frames, {self.dim}) features, got shape {frames.shape}")
        labels = np.empty(frames.shape[0], dtype=np.int64)
        sq_dist = np.empty(frames.shape[0], dtype=np.float32) if with_distance else None
        starts = range(0, frames.shape[0], self.block_frames)
        if self.threads <= 1 or len(starts) <= 1:
            for start in starts:
                self._assign_block(frames, labels, sq_dist, start)
            return labels, sq_dist
        from concurrent.futures import ThreadPoolExecutor

        import torch

        torch_threads = torch.get_num_threads()
        torch.set_num_threads(1)  # parallel over blocks, not inside each small matmul
        try:
            with ThreadPoolExecutor(self.threads) as pool:
                list(pool.map(lambda start: self._assign_block(frames, labels, sq_dist, start), starts))
        finally:
            torch.set_num_threads(torch_threads)
        return labels, sq_dist

    def assign_with_distance(self, frames: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Labels (int64) and squared distances to the nearest centroid of (n, dim) frames."""
        return self._run(frames, with_distance=True)

    def assign(self, frames: np.ndarray) -> np.ndarray:
        """Nearest-centroid label (int64) of each row of ``frames``."""
        return self._run(frames, with_distance=False)[0]

    def inertia_per_frame(self, frames: np.ndarray) -> float:
        """Mean squared distance of ``frames`` to their nearest centroid."""
        return float(self.assign_with_distance(frames)[1].astype(np.float64).mean())

    def label_utterances(
        self, pairs: Iterable[Tuple[int, np.ndarray]], where
    ) -> Iterator[Tuple[int, np.ndarray]]:
        """Yield ``(row, labels)`` per utterance, batching short utterances into one matmul.

        ``where(row)`` names an utterance in errors (feature-dim mismatches).
        """
        pending: List[Tuple[int, np.ndarray]] = []
        pending_frames = 0
        for row, feats in pairs:
            if feats.shape[1] != self.dim:
                raise ValueError(
                    f"{where(row)}: feature dim {feats.shape[1]} does not match the k-means "
                    f"centroids' dim {self.dim}"
                )
            pending.append((row, feats))
            pending_frames += feats.shape[0]
            if pending_frames >= self.chunk_frames:
                yield from self._flush(pending)
                pending, pending_frames = [], 0
        yield from self._flush(pending)

    def _flush(self, pending: List[Tuple[int, np.ndarray]]) -> Iterator[Tuple[int, np.ndarray]]:
        """Label the buffered utterances in one pass and split the labels back per utterance."""
        if not pending:
            return
        labels = self.assign(np.concatenate([feats for _, feats in pending], axis=0))
        offset = 0
        for row, feats in pending:
            yield row, labels[offset : offset + feats.shape[0]]
            offset += feats.shape[0]


class LabelLineFormatter:
    """Format label rows as ``.km`` lines (a string table is ~3x faster than ``map(str)``)."""

    def __init__(self, num_clusters: int) -> None:
        self.table = [str(i) for i in range(num_clusters)]

    def __call__(self, labels: np.ndarray) -> str:
        """One ``.km`` line (with newline) for ``labels``."""
        table = self.table
        return " ".join([table[i] for i in labels.tolist()]) + "\n"


# --------------------------------------------------------------------------- model files
def sidecar_path(npy_path: str) -> str:
    """The JSON sidecar next to a ``.npy`` array file (``km.npy`` -> ``km.json``)."""
    if not npy_path.endswith(".npy"):
        raise ValueError(f"{npy_path}: k-means and sample files must end in .npy")
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
        with open(staged.path(npy_path), "wb") as handle:
            np.save(handle, array, allow_pickle=False)
        with open(staged.path(json_path), "w", encoding="utf-8") as handle:
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
        raise ValueError(f"{json_path}: not valid JSON ({err})") from None
    if not isinstance(metadata, dict) or metadata.get("format") != expected_format:
        raise ValueError(f"{json_path}: not a {expected_format} sidecar")
    if array.ndim != 2 or array.dtype != np.float32:
        raise ValueError(f"{npy_path}: expected a float32 (rows, dim) array, got {array.dtype} {array.shape}")
    if metadata.get("sha256") != array_sha256(array):
        raise ValueError(f"{json_path}: checksum does not match {npy_path} (files from different runs?)")
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
    centroids, metadata = load_array_with_sidecar(path, KMEANS_FORMAT)
    if metadata.get("num_clusters") != centroids.shape[0] or metadata.get("dim") != centroids.shape[1]:
        raise ValueError(
            f"{sidecar_path(path)}: says K={metadata.get('num_clusters')}, dim={metadata.get('dim')} "
            f"but {path} holds {centroids.shape}"
        )
    if not np.isfinite(centroids).all():
        raise ValueError(f"{path}: centroids contain NaN or Inf")
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
