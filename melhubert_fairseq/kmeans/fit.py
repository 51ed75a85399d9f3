"""Fitting k-means centroids on sampled frames: faiss (when installed) or scikit-learn's MiniBatchKMeans."""
from __future__ import annotations

import logging
import math
from typing import Optional

import numpy as np

from melhubert_fairseq.errors import InputError

#: faiss is the default when it is installed (the optional ``faiss`` extra): in
#: benchmarks/bench_kmeans.py it fits faster than scikit-learn's MiniBatchKMeans
#: and reaches a lower held-out inertia. Without faiss, scikit-learn fits.
DEFAULT_BACKEND = "faiss"
FALLBACK_BACKEND = "sklearn"
BACKENDS = ("faiss", "sklearn")
#: Lloyd iterations for faiss; epochs over the sample for MiniBatchKMeans
#: (fairseq's simple_kmeans default, usually cut short by early stopping).
DEFAULT_ITERATIONS = {"faiss": 25, "sklearn": 100}


def import_faiss():
    """The ``faiss`` module, or None when it is not importable (it is an optional extra)."""
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # it logs its CPU probing
    try:  # an optional extra: imported only when a fit may use it
        import faiss
    except ImportError:
        return None
    return faiss


def resolve_backend(backend: Optional[str] = None) -> str:
    """The k-means backend to fit with: ``backend``, or for None faiss when installed, else scikit-learn."""
    if backend is None:
        return DEFAULT_BACKEND if import_faiss() is not None else FALLBACK_BACKEND
    if backend not in BACKENDS:
        raise InputError(f"unknown k-means backend {backend!r}; choose one of {BACKENDS}")
    if backend == "faiss" and import_faiss() is None:
        raise InputError(
            "--backend faiss: faiss is not installed (pip install 'melhubert-fairseq[faiss]', or use an "
            "installed faiss-gpu); pass --backend sklearn, or leave --backend out to fall back to it"
        )
    return backend


def fit_kmeans(
    frames: np.ndarray,
    num_clusters: int,
    backend: Optional[str] = None,
    seed: int = 0,
    iterations: Optional[int] = None,
    init: str = "k-means++",
    batch_size: int = 10000,
    threads: Optional[int] = None,
) -> np.ndarray:
    """Fit k-means on ``frames`` (n, dim); return float32 centroids (num_clusters, dim).

    ``backend`` is ``"faiss"``, ``"sklearn"`` or None (:func:`resolve_backend`);
    ``init`` is ``"k-means++"`` (both backends) or ``"random"`` (faiss' own
    initialisation: random frames, which can leave clusters merged).
    ``threads`` caps the OpenMP/BLAS threads of faiss and scikit-learn.
    """
    frames = np.ascontiguousarray(frames, dtype=np.float32)
    if frames.ndim != 2 or frames.shape[0] == 0:
        raise InputError(f"need a non-empty (frames, dim) matrix to fit k-means, got {frames.shape}")
    if num_clusters < 1:
        raise InputError(f"--num-clusters must be >= 1, got {num_clusters}")
    if num_clusters > frames.shape[0]:
        raise InputError(
            f"--num-clusters {num_clusters} is larger than the {frames.shape[0]} sampled frames; "
            "raise --sample-frac/--max-frames or lower --num-clusters"
        )
    backend = resolve_backend(backend)
    iterations = DEFAULT_ITERATIONS[backend] if iterations is None else iterations
    if init not in ("k-means++", "random"):
        raise InputError(f"unknown k-means init {init!r}; choose 'k-means++' or 'random'")
    from threadpoolctl import threadpool_limits  # deferred with scikit-learn (see _fit_sklearn)

    with threadpool_limits(limits=threads):  # None: leave the libraries' defaults
        fit = _fit_faiss if backend == "faiss" else _fit_sklearn
        centroids = fit(frames, num_clusters, seed, iterations, init, batch_size)
    return np.ascontiguousarray(centroids, dtype=np.float32)


def _fit_faiss(frames, num_clusters, seed, iterations, init, batch_size) -> np.ndarray:
    """faiss Lloyd iterations over all of ``frames`` (``batch_size`` is unused)."""
    faiss = import_faiss()
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
    # Deferred: scikit-learn takes seconds to import, and the k-means tools' --help and sampling never need it.
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
    from sklearn.cluster import kmeans_plusplus  # deferred, as in _fit_sklearn

    rng = np.random.default_rng(seed)
    # Seeding costs O(points * K * dim) and dominated the fit on all 300k frames; on
    # 20k frames it is ~10x faster with the same held-out inertia (measured, K=512).
    max_points = max(20_000, 40 * num_clusters) if max_points is None else max_points
    if frames.shape[0] > max_points:
        frames = frames[np.sort(rng.choice(frames.shape[0], max_points, replace=False))]
    centres, _ = kmeans_plusplus(frames, num_clusters, random_state=int(rng.integers(2**31 - 1)))
    return np.ascontiguousarray(centres, dtype=np.float32)

