"""Reading fairseq ``simple_kmeans`` k-means models (joblib pickles) into :class:`~melhubert_fairseq.kmeans.files.KMeansModel`.

The one place in this project that unpickles anything, behind
``melhubert-import-kmeans --trust-pickle``.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from typing import List, Tuple

import numpy as np

from melhubert_fairseq.errors import InputError, check_regular_file
from melhubert_fairseq.kmeans.files import KMeansModel


#: ``feature_source.kind`` of a model imported from fairseq: what it clustered is not recorded.
IMPORTED_SOURCE_KIND = "fairseq_simple_kmeans"


def read_simple_kmeans_joblib(path: str) -> Tuple[KMeansModel, List[str]]:
    """Unpickle a fairseq ``simple_kmeans`` model (a joblib-dumped scikit-learn (MiniBatch)KMeans) into a
    :class:`KMeansModel` of its float32 centres; also return notes for the user.

    Unpickling runs whatever code the file holds: only for files the user
    said they trust (``melhubert-import-kmeans --trust-pickle``).
    """
    # Deferred: joblib and scikit-learn take seconds to import, and only --trust-pickle imports need them.
    import joblib
    from sklearn import __version__ as sklearn_version
    from sklearn.cluster import KMeans, MiniBatchKMeans
    from sklearn.exceptions import InconsistentVersionWarning

    check_regular_file(path, what="joblib k-means model")
    with open(path, "rb") as handle:
        file_sha256 = hashlib.sha256(handle.read()).hexdigest()
    notes = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model = joblib.load(path)
        except Exception as err:  # unpickling arbitrary bytes can raise anything
            raise InputError(f"{path}: cannot unpickle it as a joblib file ({type(err).__name__}: {err})") from None
    pickled_with = None
    for caught_warning in caught:
        if isinstance(caught_warning.message, InconsistentVersionWarning):
            pickled_with = caught_warning.message.original_sklearn_version
            notes.append(f"{path} was pickled with scikit-learn {pickled_with}, read with {sklearn_version}; "
                         "only its cluster centres are used")
    kind = f"{type(model).__module__}.{type(model).__qualname__}"
    if not isinstance(model, (KMeans, MiniBatchKMeans)):
        raise InputError(
            f"{path}: holds a {kind}, not a scikit-learn MiniBatchKMeans/KMeans model "
            "(what fairseq's simple_kmeans/learn_kmeans.py writes)"
        )
    centres = getattr(model, "cluster_centers_", None)
    if centres is None:
        raise InputError(f"{path}: the {type(model).__name__} was never fitted (it has no cluster_centers_)")
    centres = np.asarray(centres)
    if centres.ndim != 2 or centres.shape[0] == 0 or centres.dtype.kind != "f":
        raise InputError(f"{path}: cluster_centers_ is a {centres.dtype} array of shape {centres.shape}, "
                         "expected float (K, dim)")
    if not np.isfinite(centres).all():
        raise InputError(f"{path}: cluster_centers_ contain NaN or Inf")
    centroids = np.ascontiguousarray(centres, dtype=np.float32)
    if centres.dtype != np.float32:
        change = float(np.abs(centroids.astype(np.float64) - centres).max())
        notes.append(f"{centres.dtype} centres stored as float32 (largest change {change:.3g})")
    params = {key: value for key, value in model.get_params().items()
              if isinstance(value, (bool, int, float, str, type(None)))}
    metadata = {
        "feature_source": {"kind": IMPORTED_SOURCE_KIND},
        "imported_from": {
            "path": os.path.abspath(path), "sha256": file_sha256, "class": kind,
            "sklearn_version": pickled_with or sklearn_version, "params": params,
            # scikit-learn's inertia_: the sum over the frames it was fitted on (not per frame)
            "inertia_": float(model.inertia_) if getattr(model, "inertia_", None) is not None else None,
        },
    }
    return KMeansModel(centroids, metadata), notes
