"""Nearest-centroid labels for frames (their ``.km`` lines are :mod:`melhubert_fairseq.data.manifest`'s)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator, List, Optional, Tuple

import numpy as np

from melhubert_fairseq.errors import InputError


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
        import torch  # deferred, as in __init__

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
        import torch  # deferred, as in __init__

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
                raise InputError(
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

