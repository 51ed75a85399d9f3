"""K-means targets for Mel-HuBERT: feature sources, frame sampling, fitting, label assignment, safe model files.

Stage 1 clusters normalised 10 ms fbank frames; stage 2 clusters the hidden
states of one transformer layer of a trained ``mel_hubert`` checkpoint (one
frame per model frame). Both go through a *feature source* that yields
``(manifest_row, frames)`` for the rows of a shard, so sampling, fitting and
labelling are the same code for either stage.

* :mod:`~melhubert_fairseq.kmeans.sources`: the frames (fbank, or a checkpoint layer) and the flags that pick them;
* :mod:`~melhubert_fairseq.kmeans.sample`: random whole utterances of a shard, capped in frames;
* :mod:`~melhubert_fairseq.kmeans.fit`: faiss or scikit-learn fitting;
* :mod:`~melhubert_fairseq.kmeans.assign`: nearest-centroid labels (``.km`` lines are :mod:`melhubert_fairseq.data.manifest`'s);
* :mod:`~melhubert_fairseq.kmeans.files`: the pickle-free ``.npy`` + ``.json`` model and sample files;
* :mod:`~melhubert_fairseq.kmeans.fairseq_import`: fairseq ``simple_kmeans`` joblib models, behind an explicit trust flag.

Shards are :mod:`melhubert_fairseq.data.shards`' (fairseq's ``get_shard_range``).
Everything is re-exported here, so ``from melhubert_fairseq.kmeans import ...`` keeps working.
"""
from melhubert_fairseq.data.shards import shard_file_name, shard_range, split_name
from melhubert_fairseq.kmeans.assign import KMeansAssigner
from melhubert_fairseq.kmeans.fairseq_import import IMPORTED_SOURCE_KIND, read_simple_kmeans_joblib
from melhubert_fairseq.kmeans.files import (
    KMEANS_FORMAT,
    SAMPLE_FORMAT,
    KMeansModel,
    array_sha256,
    load_array_with_sidecar,
    load_kmeans,
    load_sample,
    save_array_with_sidecar,
    save_kmeans,
    save_sample,
    sidecar_path,
)
from melhubert_fairseq.kmeans.fit import (
    BACKENDS,
    DEFAULT_BACKEND,
    DEFAULT_ITERATIONS,
    FALLBACK_BACKEND,
    fit_kmeans,
    import_faiss,
    kmeans_plusplus_init,
    resolve_backend,
)
from melhubert_fairseq.kmeans.sample import FrameSample, choose_sample_rows, sample_frames
from melhubert_fairseq.kmeans.sources import (
    FbankSource,
    FeatureIterator,
    FeatureSource,
    ModelLayerSource,
    add_feature_source_arguments,
    feature_source_from_args,
    open_feature_source,
)

__all__ = [
    "BACKENDS", "DEFAULT_BACKEND", "DEFAULT_ITERATIONS", "FALLBACK_BACKEND", "IMPORTED_SOURCE_KIND",
    "KMEANS_FORMAT", "SAMPLE_FORMAT", "FbankSource", "FeatureIterator", "FeatureSource", "FrameSample",
    "KMeansAssigner", "KMeansModel", "ModelLayerSource", "add_feature_source_arguments",
    "array_sha256", "choose_sample_rows", "feature_source_from_args", "fit_kmeans", "import_faiss",
    "kmeans_plusplus_init", "load_array_with_sidecar", "load_kmeans", "load_sample", "open_feature_source",
    "read_simple_kmeans_joblib", "resolve_backend", "sample_frames", "save_array_with_sidecar", "save_kmeans",
    "save_sample", "shard_file_name", "shard_range", "sidecar_path", "split_name",
]
