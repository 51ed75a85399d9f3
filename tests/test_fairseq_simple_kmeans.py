"""fairseq's ``examples/hubert/simple_kmeans`` artifacts: joblib k-means models, shard ranges, ``.km`` shards.

The reference side of each test re-states what fairseq's scripts do
(learn_kmeans.py's MiniBatchKMeans and joblib.dump, dump_km_label.py's
ApplyKmeans and line format, feature_utils.get_shard_range), so a model or a
shard a HuBERT user already holds works with our tools unchanged.
"""
from __future__ import annotations

import hashlib
import os
import sys

import joblib
import numpy as np
import pytest
from sklearn.cluster import MiniBatchKMeans

from melhubert_fairseq.data.manifest import write_manifest
from melhubert_fairseq.data.shards import shard_range
from melhubert_fairseq.kmeans import load_kmeans
from melhubert_fairseq.tools import dump_km_labels, import_kmeans, merge_km_shards

K = 8
DIM = 40


def fairseq_shard_range(tot, nshard, rank):
    """feature_utils.get_shard_range: Python float division, rounded half to even."""
    return round(tot / nshard * rank), round(tot / nshard * (rank + 1))


def fairseq_learn_kmeans(feats: np.ndarray, km_path: str, seed: int = 0) -> MiniBatchKMeans:
    """learn_kmeans.py with its default flags (--percent -1: every frame), then joblib.dump."""
    np.random.seed(seed)  # the recipe seeds numpy's global RNG; the model has no random_state
    model = MiniBatchKMeans(
        n_clusters=K, init="k-means++", max_iter=100, batch_size=10000, verbose=0, compute_labels=False,
        tol=0.0, max_no_improvement=100, init_size=None, n_init=20, reassignment_ratio=0.0,
    )  # verbose=1 in the recipe; it only prints
    model.fit(feats)
    joblib.dump(model, km_path)
    return model


def fairseq_apply_kmeans(model: MiniBatchKMeans, x: np.ndarray) -> np.ndarray:
    """dump_km_label.ApplyKmeans on numpy features: argmin of |x|^2 - 2 x C + |C|^2."""
    centres_t = model.cluster_centers_.transpose()
    dist = (x**2).sum(1, keepdims=True) - 2 * np.matmul(x, centres_t) + (centres_t**2).sum(0, keepdims=True)
    return np.argmin(dist, axis=1)


def fairseq_km_lines(labels) -> str:
    """dump_km_label.py's ``.km`` lines."""
    return "".join(" ".join(map(str, row.tolist())) + "\n" for row in labels)


@pytest.fixture(scope="module")
def fairseq_model(tmp_path_factory):
    """24 utterances of overlapping clusters, a model fitted by fairseq's recipe, and its import."""
    tmp = tmp_path_factory.mktemp("simple_kmeans")
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(K, DIM)) * 0.6  # overlapping: many frames sit between centres
    os.makedirs(tmp / "feats")
    rows, utterances = [], []
    for index in range(24):
        feats = (centres[rng.integers(0, K, int(rng.integers(40, 160)))]
                 + rng.normal(size=(1, DIM))).astype(np.float32)
        feats += rng.normal(size=feats.shape).astype(np.float32)
        np.save(tmp / "feats" / f"u{index:02d}.npy", feats)
        rows.append((f"u{index:02d}.npy", len(feats)))
        utterances.append(feats)
    manifest = str(tmp / "train.tsv")
    write_manifest(manifest, str(tmp / "feats"), rows)
    joblib_path = str(tmp / "hubert_L9_km8.bin")
    model = fairseq_learn_kmeans(np.concatenate(utterances), joblib_path)
    km_path = str(tmp / "km" / "imported.npy")
    assert import_kmeans.main(["--joblib", joblib_path, "--km-path", km_path, "--trust-pickle"]) == 0
    return tmp, manifest, utterances, model, km_path


def test_imported_model_labels_exactly_like_fairseqs_apply_kmeans(fairseq_model):
    tmp, manifest, utterances, model, km_path = fairseq_model
    imported = load_kmeans(km_path)
    assert model.cluster_centers_.dtype == np.float32
    assert np.array_equal(imported.centroids, model.cluster_centers_)
    assert imported.metadata["imported_from"]["params"]["n_init"] == 20
    out = tmp / "ours"
    assert dump_km_labels.main(["--manifest", manifest, "--km-path", km_path, "--out-dir", str(out),
                                "--no-progress"]) == 0
    reference = [fairseq_apply_kmeans(model, feats) for feats in utterances]
    assert len(set(np.concatenate(reference).tolist())) == K  # every cluster is used: a real test of the argmin
    # Our .km and dict.km.txt are byte for byte what fairseq's dump_km_label.py and HuBERT's recipe write.
    assert (out / "train.km").read_text() == fairseq_km_lines(reference)
    assert (out / "dict.km.txt").read_text() == "".join(f"{cluster} 1\n" for cluster in range(K))


def test_shard_ranges_are_fairseqs(tiny_checkpoint):
    assert [shard_range(5, 2, rank) for rank in range(2)] == [(0, 2), (2, 5)]  # np.array_split: 3 + 2
    for total, nshard in [(5, 2), (10, 4), (24, 5), (7, 7), (3, 1), (1000, 3), (281241, 16)]:
        assert [shard_range(total, nshard, r) for r in range(nshard)] == [
            fairseq_shard_range(total, nshard, r) for r in range(nshard)
        ]
    # Stage-2 hidden states take the same rows (12 rows in 5 shards: fairseq 2+3+2+3+2, array_split 3+3+2+2+2).
    from melhubert_fairseq.feature_reader import MelHubertFeatureReader

    reader = MelHubertFeatureReader(str(tiny_checkpoint))
    manifest = str(tiny_checkpoint.parent.parent / "data" / "train.tsv")
    for rank in range(5):
        rows = [row for row, _ in reader.iter_manifest(manifest, layer=0, nshard=5, rank=rank)]
        assert rows == list(range(*fairseq_shard_range(12, 5, rank)))
    with pytest.raises(ValueError, match="--rank must be in"):
        shard_range(10, 3, 3)
    with pytest.raises(ValueError, match="larger than the number of utterances"):
        shard_range(3, 4, 0)


def test_merge_takes_shards_from_fairseqs_dump_and_ours_alike(fairseq_model):
    tmp, manifest, utterances, model, km_path = fairseq_model
    nshard, labels = 5, tmp / "mixed"  # 24 rows: fairseq's 5+5+4+5+5, np.array_split's 5+5+5+5+4
    os.makedirs(labels)
    for rank in range(nshard):
        if rank % 2 == 0:  # fairseq's dump_km_label.py: {split}_{rank}_{nshard}.km over get_shard_range's rows
            start, end = fairseq_shard_range(len(utterances), nshard, rank)
            shard = [fairseq_apply_kmeans(model, feats) for feats in utterances[start:end]]
            (labels / f"train_{rank}_{nshard}.km").write_text(fairseq_km_lines(shard))
        else:
            assert dump_km_labels.main(["--manifest", manifest, "--km-path", km_path, "--out-dir", str(labels),
                                        "--nshard", str(nshard), "--rank", str(rank), "--no-progress"]) == 0
    assert merge_km_shards.main(["--manifest", manifest, "--label-dir", str(labels), "--nshard", str(nshard),
                                 "--no-progress"]) == 0
    reference = [fairseq_apply_kmeans(model, feats) for feats in utterances]
    assert (labels / "train.km").read_text() == fairseq_km_lines(reference)


def digest(folder) -> dict:
    """sha256 of every file below ``folder``."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def write_unfitted(path):
    joblib.dump(MiniBatchKMeans(n_clusters=K), path)


@pytest.mark.parametrize(
    "write, flags, message",
    [
        (lambda path: joblib.dump({"n_clusters": 8}, path), ["--trust-pickle"],
         "m.bin: holds a builtins.dict, not a scikit-learn MiniBatchKMeans/KMeans model"),
        (write_unfitted, ["--trust-pickle"], "m.bin: the MiniBatchKMeans was never fitted"),
        (lambda path: open(path, "wb").write(os.urandom(300)), ["--trust-pickle"],
         "m.bin: cannot unpickle it as a joblib file"),
        (write_unfitted, [], "m.bin: a joblib k-means model is a pickle, and unpickling runs any code it holds; "
                             "pass --trust-pickle to unpickle it (only for files you trust)"),
    ],
    ids=["not-kmeans", "unfitted", "garbage", "no-trust-flag"],
)
def test_import_refuses_bad_or_untrusted_pickles_with_one_line(tmp_path, capsys, monkeypatch, write, flags, message):
    (tmp_path / "in").mkdir()
    write(tmp_path / "in" / "m.bin")
    before = digest(tmp_path / "in")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["melhubert-import-kmeans", "--joblib", "in/m.bin", "--km-path", "out/km.npy",
                                      *flags])
    assert import_kmeans.main() == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], errors
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"] and digest(tmp_path / "in") == before


def test_tools_given_a_joblib_model_say_to_import_it(fairseq_model, tmp_path, capsys, monkeypatch):
    _, manifest, _, _, _ = fairseq_model
    joblib_path = str(fairseq_model[0] / "hubert_L9_km8.bin")
    monkeypatch.setattr(sys, "argv", ["melhubert-dump-km-labels", "--manifest", manifest, "--km-path", joblib_path,
                                      "--out-dir", str(tmp_path / "out"), "--no-progress"])
    assert dump_km_labels.main() == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: {joblib_path}: not a k-means model of melhubert-learn-kmeans (NAME.npy centroids with a NAME.json "
        "sidecar); for a fairseq simple_kmeans (joblib) model, run melhubert-import-kmeans --trust-pickle first"
    )
    assert not (tmp_path / "out").exists()
