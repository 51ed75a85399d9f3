"""k-means label tools: learning, labelling, sharding, safe centroid files and bad input."""
from __future__ import annotations

import json
import os
import sys
import types

import numpy as np
import pytest

from melhubert_fairseq.data.features import MeanStd, save_mean_std, stack_frames
from melhubert_fairseq.data.labels import load_km_labels
from melhubert_fairseq.data.manifest import read_manifest, write_manifest
from melhubert_fairseq.errors import InputError
from melhubert_fairseq.kmeans import (
    KMeansAssigner,
    KMeansModel,
    import_faiss,
    load_kmeans,
    save_kmeans,
    sidecar_path,
)
from melhubert_fairseq.tools import dump_km_labels, learn_kmeans, merge_km_shards

NUM_CENTRES = 8
DIM = 40


def make_corpus(root, num_utts=24, seed=0, dim=DIM, transform=None):
    """Frames drawn around 8 well-separated centres; returns (manifest path, true labels per utterance)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(NUM_CENTRES, dim)) * 4.0  # centre spacing ~ 35, noise radius ~ 6
    feat_dir = os.path.join(root, "feats")
    os.makedirs(feat_dir)
    rows, truth = [], []
    for index in range(num_utts):
        num_frames = int(rng.integers(40, 160))
        cluster = rng.integers(0, NUM_CENTRES, size=num_frames)
        feats = (centres[cluster] + rng.normal(size=(num_frames, dim))).astype(np.float32)
        if transform is not None:
            feats = transform(feats)
        # float16 on disk is allowed; store one utterance that way.
        np.save(os.path.join(feat_dir, f"utt{index:03d}.npy"), feats.astype(np.float16) if index == 3 else feats)
        rows.append((f"utt{index:03d}.npy", num_frames))
        truth.append(cluster)
    manifest = os.path.join(root, "train.tsv")
    write_manifest(manifest, feat_dir, rows)
    return manifest, truth


def purity(truth, predicted):
    """Fraction of frames whose predicted cluster's majority true cluster is their own."""
    table = np.zeros((predicted.max() + 1, truth.max() + 1), dtype=np.int64)
    np.add.at(table, (predicted, truth), 1)
    return table.max(axis=1).sum() / len(truth)


def learn(manifest, km_path, *extra):
    """Run learn_kmeans with small-data settings."""
    return learn_kmeans.main(["--manifest", manifest, "--km-path", km_path, "--num-clusters", "8",
                              "--sample-frac", "0.5", "--no-progress", *extra])


def dump(manifest, km_path, out_dir, *extra):
    """Run dump_km_labels."""
    return dump_km_labels.main(["--manifest", manifest, "--km-path", km_path, "--out-dir", out_dir,
                                "--no-progress", *extra])


@pytest.fixture
def corpus(tmp_path):
    """A small clustered corpus: (manifest, truth, tmp_path)."""
    manifest, truth = make_corpus(str(tmp_path))
    return manifest, truth, tmp_path


FAISS_MISSING = import_faiss() is None


@pytest.mark.parametrize("backend", [
    pytest.param("faiss", marks=[pytest.mark.faiss, pytest.mark.skipif(
        FAISS_MISSING, reason="faiss is not installed (extra 'faiss'); the sklearn case covers the fallback")]),
    "sklearn",
])
def test_learn_and_dump_recover_clusters_in_manifest_order(corpus, backend, capsys):
    manifest, truth, tmp = corpus
    km = str(tmp / "km" / "k8.npy")
    learn(manifest, km, "--backend", backend)
    summary = capsys.readouterr().out
    assert "inertia/frame" in summary
    dump(manifest, km, str(tmp / "labels"))
    labels = list(load_km_labels(str(tmp / "labels" / "train.km")))
    assert [len(row) for row in labels] == [len(t) for t in truth]
    all_truth, all_pred = np.concatenate(truth), np.concatenate(labels)
    assert purity(all_truth, all_pred) >= 0.99
    assert len(np.unique(all_pred)) == NUM_CENTRES
    # Row order: each utterance's labels map onto its own truth (cluster ids up to a permutation).
    mapping = {p: t for p, t in zip(all_pred, all_truth)}
    for row_truth, row_pred in zip(truth, labels):
        assert np.array_equal([mapping[p] for p in row_pred], row_truth)
    with open(tmp / "labels" / "dict.km.txt") as handle:
        assert handle.read().splitlines() == [f"{i} 1" for i in range(8)]
    meta = json.load(open(sidecar_path(km)))
    assert (meta["num_clusters"], meta["dim"], meta["backend"]) == (8, DIM, backend)
    assert meta["feature_source"]["kind"] == "fbank"
    # Unit-variance noise in 40 dims: a correct fit leaves ~40 per frame.
    assert 30 < meta["inertia_per_frame"] < 50
    assert 0 < meta["frames_used"] < sum(len(t) for t in truth)


def test_sharded_learn_and_label_merge_equal_unsharded(corpus):
    manifest, truth, tmp = corpus
    for rank in range(3):
        learn_kmeans.main(["--manifest", manifest, "--nshard", "3", "--rank", str(rank), "--sample-dir",
                           str(tmp / "samples"), "--sample-frac", "0.5", "--no-progress"])
    assert sorted(os.listdir(tmp / "samples")) == sorted(
        f"train_{r}_3.{ext}" for r in range(3) for ext in ("npy", "json"))
    km = str(tmp / "km.npy")
    learn(manifest, km, "--nshard", "3", "--sample-dir", str(tmp / "samples"), "--seed", "7")
    meta = load_kmeans(km).metadata
    # Sampling as the shards were drawn; the fit's own seed as given.
    assert (meta["sample_seed"], meta["sample_frac"], meta["nshard"], meta["seed"]) == (0, 0.5, 3, 7)
    dump(manifest, km, str(tmp / "whole"))
    for rank in range(3):
        dump(manifest, km, str(tmp / "sharded"), "--nshard", "3", "--rank", str(rank))
    merge_km_shards.main(["--manifest", manifest, "--label-dir", str(tmp / "sharded"), "--nshard", "3",
                          "--no-progress"])
    merged = (tmp / "sharded" / "train.km").read_bytes()
    assert merged == (tmp / "whole" / "train.km").read_bytes()
    labels = np.concatenate(list(load_km_labels(str(tmp / "whole" / "train.km"))))
    assert purity(np.concatenate(truth), labels) >= 0.99


def test_merge_refuses_missing_or_short_shards(corpus):
    manifest, _, tmp = corpus
    km = str(tmp / "km.npy")
    learn(manifest, km)
    for rank in range(2):
        dump(manifest, km, str(tmp / "lab"), "--nshard", "2", "--rank", str(rank))
    args = ["--manifest", manifest, "--label-dir", str(tmp / "lab"), "--nshard", "2", "--no-progress"]
    shard1 = tmp / "lab" / "train_1_2.km"
    lines = shard1.read_text().splitlines(keepends=True)
    shard1.write_text("".join(lines[:-1]))
    with pytest.raises(ValueError, match="train_1_2.km: has 11 lines but its shard holds 12"):
        merge_km_shards.main(args)
    shard1.write_text("".join(lines[:-1]) + "0 1 2\n")
    with pytest.raises(ValueError, match=r"3 labels but \d+ expected for .*utt023"):
        merge_km_shards.main(args)
    shard1.unlink()
    with pytest.raises(FileNotFoundError, match="1 of 2 label shards are missing"):
        merge_km_shards.main(args)
    assert not (tmp / "lab" / "train.km").exists()


def test_sharded_learning_needs_a_sample_dir(corpus, capsys):
    manifest, _, tmp = corpus
    with pytest.raises(SystemExit):
        learn(manifest, str(tmp / "km.npy"), "--nshard", "2")
    assert "need --sample-dir" in capsys.readouterr().err


def test_learn_from_sample_shards_needs_all_of_them_drawn_alike(corpus):
    manifest, _, tmp = corpus
    sample = ["--manifest", manifest, "--nshard", "2", "--sample-dir", str(tmp / "s"), "--no-progress"]
    learn_kmeans.main([*sample, "--rank", "0"])
    with pytest.raises(FileNotFoundError, match="1 of 2 sample shards are missing"):
        learn(manifest, str(tmp / "km.npy"), "--nshard", "2", "--sample-dir", str(tmp / "s"))
    learn_kmeans.main([*sample, "--rank", "1", "--sample-frac", "0.3"])
    with pytest.raises(ValueError, match="train_1_2.npy: sampled from .*frac 0.3.*same flags"):
        learn(manifest, str(tmp / "km.npy"), "--nshard", "2", "--sample-dir", str(tmp / "s"))
    assert not (tmp / "km.npy").exists()


def test_centroid_file_round_trip_and_tamper_detection(tmp_path):
    centroids = np.random.default_rng(0).normal(size=(16, 5)).astype(np.float32)
    path = str(tmp_path / "km.npy")
    save_kmeans(path, KMeansModel(centroids, {"feature_source": {"kind": "fbank"}, "inertia_per_frame": 1.5}))
    loaded = load_kmeans(path)
    assert np.array_equal(loaded.centroids, centroids) and loaded.centroids.dtype == np.float32
    assert (loaded.num_clusters, loaded.dim, loaded.metadata["inertia_per_frame"]) == (16, 5, 1.5)
    np.save(path, centroids * 2)  # centroids replaced behind the sidecar's back
    with pytest.raises(ValueError, match="checksum does not match"):
        load_kmeans(path)
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)  # a pickle is never loaded
    with pytest.raises(ValueError, match="not a plain .npy array"):
        load_kmeans(path)
    np.save(path, centroids)
    os.unlink(sidecar_path(path))
    with pytest.raises(FileNotFoundError, match="sidecar"):
        load_kmeans(path)


def test_outputs_are_never_overwritten_without_flag(corpus):
    manifest, _, tmp = corpus
    km = str(tmp / "km.npy")
    learn(manifest, km)
    before = open(km, "rb").read()
    with pytest.raises(FileExistsError, match="--overwrite"):
        learn(manifest, km, "--seed", "5")
    assert open(km, "rb").read() == before
    learn(manifest, km, "--seed", "5", "--overwrite")
    dump(manifest, km, str(tmp / "lab"))
    with pytest.raises(FileExistsError, match="train.km already exists"):
        dump(manifest, km, str(tmp / "lab"))
    dump(manifest, km, str(tmp / "lab"), "--overwrite")


def test_dictionary_of_another_k_is_not_replaced(corpus):
    manifest, _, tmp = corpus
    km = str(tmp / "km.npy")
    learn(manifest, km)
    (tmp / "lab").mkdir()
    (tmp / "lab" / "dict.km.txt").write_text("0 1\n1 1\n")
    with pytest.raises(FileExistsError, match="lists 2 clusters but the k-means model has 8"):
        dump(manifest, km, str(tmp / "lab"))
    assert sorted(os.listdir(tmp / "lab")) == ["dict.km.txt"]  # refused before labelling anything


def test_single_thread_run_gives_the_same_labels(corpus):
    import torch

    manifest, _, tmp = corpus
    km = str(tmp / "km.npy")
    learn(manifest, km)
    dump(manifest, km, str(tmp / "default"))
    torch_threads = torch.get_num_threads()
    try:
        learn(manifest, str(tmp / "km1.npy"), "--threads", "1")
        dump(manifest, km, str(tmp / "one"), "--threads", "1")
    finally:
        torch.set_num_threads(torch_threads)  # main() sets it process-wide
    assert np.allclose(np.load(tmp / "km1.npy"), np.load(km), atol=1e-4)  # summation order may differ
    assert (tmp / "one" / "train.km").read_bytes() == (tmp / "default" / "train.km").read_bytes()


def test_mean_std_normalises_raw_features(tmp_path):
    mean, std = np.linspace(-3, 3, DIM), np.linspace(0.5, 4, DIM)
    manifest, truth = make_corpus(str(tmp_path), transform=lambda f: (f * std + mean).astype(np.float32))
    stats_path = str(tmp_path / "mean-std.npy")
    save_mean_std(stats_path, MeanStd(mean.astype(np.float32), std.astype(np.float32)))
    km = str(tmp_path / "km.npy")
    learn(manifest, km, "--mean-std", stats_path)
    dump(manifest, km, str(tmp_path / "lab"), "--mean-std", stats_path)
    labels = np.concatenate(list(load_km_labels(str(tmp_path / "lab" / "train.km"))))
    assert purity(np.concatenate(truth), labels) >= 0.99
    assert 30 < load_kmeans(km).metadata["inertia_per_frame"] < 50  # measured in normalised space


def test_empty_manifest_is_an_error(tmp_path):
    manifest = tmp_path / "train.tsv"
    manifest.write_text(f"{tmp_path}\n")
    with pytest.raises(ValueError, match="empty manifest"):
        learn(str(manifest), str(tmp_path / "km.npy"))
    assert not (tmp_path / "km.npy").exists()


def test_feature_dim_mismatch_names_the_utterance(corpus, tmp_path_factory):
    manifest, _, tmp = corpus
    km = str(tmp / "km.npy")
    learn(manifest, km)
    other_root = tmp_path_factory.mktemp("other")
    other_manifest, _ = make_corpus(str(other_root), num_utts=3, dim=20)
    with pytest.raises(ValueError, match=r"utt000.*feature dim 20 does not match the k-means centroids' dim 40"):
        dump(other_manifest, km, str(other_root / "lab"))
    assert not (other_root / "lab" / "train.km").exists()


def test_nan_frames_name_the_utterance_and_leave_no_output(corpus):
    manifest, _, tmp = corpus
    km = str(tmp / "km.npy")
    learn(manifest, km)
    bad = read_manifest(manifest).full_path(5)
    feats = np.load(bad)
    feats[7, 3] = np.nan
    np.save(bad, feats)
    with pytest.raises(ValueError, match=r"utt005.*1 frame\(s\) with NaN/Inf \(first at frame 7\)"):
        dump(manifest, km, str(tmp / "lab"))
    assert not os.path.exists(tmp / "lab")  # no labels, no temporary file, no empty output folder
    with pytest.raises(ValueError, match="utt005.*NaN/Inf"):
        learn(manifest, str(tmp / "km2.npy"), "--sample-frac", "1")


def test_frame_count_disagreeing_with_manifest_names_the_utterance(corpus):
    manifest, _, tmp = corpus
    km = str(tmp / "km.npy")
    learn(manifest, km)
    bad = read_manifest(manifest).full_path(2)
    np.save(bad, np.load(bad)[:-1])
    with pytest.raises(ValueError, match=r"utt002.*frames but the manifest says \d+"):
        dump(manifest, km, str(tmp / "lab"))


def test_more_clusters_than_sampled_frames_is_an_error(corpus):
    manifest, _, tmp = corpus
    with pytest.raises(ValueError, match="--num-clusters 5000 is larger than the .* sampled frames"):
        learn_kmeans.main(["--manifest", manifest, "--km-path", str(tmp / "km.npy"), "--num-clusters", "5000",
                           "--no-progress"])
    assert not (tmp / "km.npy").exists()


def test_max_frames_caps_the_fitted_sample(corpus):
    manifest, _, tmp = corpus
    km = str(tmp / "km.npy")
    learn(manifest, km, "--sample-frac", "1", "--max-frames", "500")
    assert load_kmeans(km).metadata["frames_used"] == 500


@pytest.mark.parametrize("num_frames", [1, 1023, 5000])
def test_assigner_matches_brute_force_argmin(num_frames):
    rng = np.random.default_rng(num_frames)
    centroids = rng.normal(size=(37, 6)).astype(np.float32)
    frames = rng.normal(size=(num_frames, 6)).astype(np.float32)
    distances = ((frames[:, None, :].astype(np.float64) - centroids[None]) ** 2).sum(-1)
    labels, sq_dist = KMeansAssigner(centroids, cpu_chunk_frames=256, threads=2).assign_with_distance(frames)
    assert np.array_equal(labels, distances.argmin(1))
    assert np.allclose(sq_dist, distances.min(1), rtol=1e-4, atol=1e-4)


def test_label_utterances_batches_but_keeps_utterances_apart():
    rng = np.random.default_rng(1)
    centroids = rng.normal(size=(9, 4)).astype(np.float32)
    utterances = [(row, rng.normal(size=(n, 4)).astype(np.float32)) for row, n in enumerate([3, 700, 1, 50, 400])]
    assigner = KMeansAssigner(centroids, chunk_frames=512)
    out = list(assigner.label_utterances(iter(utterances), where=str))
    assert [row for row, _ in out] == [0, 1, 2, 3, 4]
    for (_, feats), (_, labels) in zip(utterances, out):
        assert np.array_equal(labels, assigner.assign(feats))


def test_without_faiss_learning_falls_back_to_sklearn(corpus, monkeypatch, capsys):
    manifest, truth, tmp = corpus
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` now fails as if it were not installed
    with pytest.raises(ValueError, match=r"--backend faiss: faiss is not installed \(pip install 'melhubert-fairseq\[faiss\]'"):
        learn(manifest, str(tmp / "faiss.npy"), "--backend", "faiss")
    assert not (tmp / "faiss.npy").exists()
    learn(manifest, str(tmp / "km.npy"))
    assert "note: faiss is not installed, fitting with sklearn" in capsys.readouterr().err
    model = load_kmeans(str(tmp / "km.npy"))
    assert (model.metadata["backend"], model.metadata["iterations"]) == ("sklearn", 100)
    dump(manifest, str(tmp / "km.npy"), str(tmp / "lab"))
    labels = np.concatenate(list(load_km_labels(str(tmp / "lab" / "train.km"))))
    assert purity(np.concatenate(truth), labels) > 0.99


def test_without_faiss_a_bad_input_is_the_only_line(corpus, monkeypatch, capsys):
    """The fallback note comes after every input is read: a bad input stays one `error:` line without faiss."""
    manifest, _, tmp = corpus
    monkeypatch.setitem(sys.modules, "faiss", None)
    rows = open(manifest).read().splitlines()
    first_feature = os.path.join(rows[0], rows[1].split("\t")[0])
    with open(first_feature, "wb") as handle:
        handle.write(b"not a .npy file")
    with pytest.raises(InputError, match=r"train\.tsv:2 \(utt000\)"):
        learn(manifest, str(tmp / "km.npy"))
    assert "note:" not in capsys.readouterr().err
    assert not (tmp / "km.npy").exists()


def test_a_feature_file_of_another_dimension_is_a_user_error_naming_it(corpus):
    """Features of mixed dimensions (a 80-dim file among 40-dim ones) cannot be clustered together: the tool
    names the manifest line and utterance (an InputError: one ``error:`` line, exit 2) and writes nothing."""
    manifest, _, tmp = corpus
    rows = open(manifest).read().splitlines()
    name = rows[3].split("\t")[0]
    path = os.path.join(rows[0], name)
    feats = np.load(path)
    np.save(path, np.concatenate([feats, feats], axis=1))
    with pytest.raises(InputError, match=r"train\.tsv:4 \(utt002\).*feature dim 80 differs from the 40"):
        learn(manifest, str(tmp / "km.npy"), "--sample-frac", "1")  # every utterance read
    assert not (tmp / "km.npy").exists()


# ----------------------------------------------------------------------------- stage 2
class StackingReader:
    """Stand-in for MelHubertFeatureReader with its documented API: "hidden states" are
    the fbank frames stacked by 2 (80 dims at 50 Hz), so the clusters are known."""

    frame_rate_hz = 50.0
    calls = []

    def __init__(self, checkpoint_path, device="cpu", max_batch_frames=20000):
        self.checkpoint_path = checkpoint_path

    def iter_manifest_rows(self, manifest, rows, layers):
        """Yield (row, [(ceil(T/2), 80)]) for ``rows`` of the read manifest."""
        rows = list(rows)
        StackingReader.calls.append((manifest.path, list(layers), rows))
        for row in rows:
            yield row, [stack_frames(np.load(manifest.full_path(row)).astype(np.float32), 2)]


@pytest.fixture
def stacking_reader(monkeypatch):
    """Install StackingReader as melhubert_fairseq.feature_reader.MelHubertFeatureReader."""
    module = types.ModuleType("melhubert_fairseq.feature_reader")
    module.MelHubertFeatureReader = StackingReader
    monkeypatch.setitem(sys.modules, "melhubert_fairseq.feature_reader", module)
    StackingReader.calls = []
    return StackingReader


def test_stage2_labels_one_per_model_frame_via_reader_api(corpus, stacking_reader, capsys):
    manifest, truth, tmp = corpus
    ckpt = str(tmp / "checkpoint_best.pt")
    km = str(tmp / "km_l8.npy")
    learn(manifest, km, "--checkpoint", ckpt, "--layer", "8")
    # Sampling forwards only the sampled utterances, not the whole corpus.
    assert stacking_reader.calls[0][1] == [8] and 0 < len(stacking_reader.calls[0][2]) < len(truth)
    meta = load_kmeans(km).metadata
    assert meta["dim"] == 2 * DIM
    assert meta["feature_source"]["kind"] == "mel_hubert_layer"
    assert (meta["feature_source"]["layer"], meta["feature_source"]["frame_rate_hz"]) == (8, 50.0)
    for rank in range(2):
        dump(manifest, km, str(tmp / "lab2"), "--checkpoint", ckpt, "--layer", "8", "--nshard", "2",
             "--rank", str(rank))
    merge_km_shards.main(["--manifest", manifest, "--label-dir", str(tmp / "lab2"), "--nshard", "2",
                          "--label-rate-hz", "50", "--no-progress"])
    labels = list(load_km_labels(str(tmp / "lab2" / "train.km")))
    assert [len(row) for row in labels] == [(len(t) + 1) // 2 for t in truth]
    dump(manifest, km, str(tmp / "lab1"), "--checkpoint", ckpt, "--layer", "8")
    assert (tmp / "lab1" / "train.km").read_bytes() == (tmp / "lab2" / "train.km").read_bytes()
    with pytest.raises(SystemExit):
        merge_km_shards.main(["--manifest", manifest, "--label-dir", str(tmp / "lab2"), "--nshard", "2",
                              "--label-rate-hz", "30", "--no-progress", "--out", str(tmp / "x.km")])
    assert "--label-rate-hz: label rate 30 Hz is not 100 Hz divided by an integer" in capsys.readouterr().err


def test_stage2_reader_output_not_matching_manifest_is_an_error(corpus, stacking_reader, monkeypatch):
    manifest, _, tmp = corpus
    full_length = StackingReader.iter_manifest_rows

    def short_by_one(self, manifest, rows, layers):
        for row, states in full_length(self, manifest, rows, layers):
            yield row, [states[0][:-1]]

    monkeypatch.setattr(StackingReader, "iter_manifest_rows", short_by_one)
    with pytest.raises(ValueError, match=r"layer 8 of .*utt\d+.*frames but \d+ were expected"):
        learn(manifest, str(tmp / "km.npy"), "--checkpoint", str(tmp / "ck.pt"), "--layer", "8")


def test_stage2_flags_must_come_together(corpus):
    manifest, _, tmp = corpus
    with pytest.raises(ValueError, match="--layer needs --checkpoint"):
        learn(manifest, str(tmp / "km.npy"), "--layer", "8")


def test_stage2_with_a_trained_checkpoint(corpus, tiny_checkpoint):
    """End to end on a real (tiny, 2-layer, 64-dim, 20 ms) mel_hubert checkpoint."""
    manifest, truth, tmp = corpus
    km = str(tmp / "km_l2.npy")
    flags = ["--checkpoint", str(tiny_checkpoint), "--layer", "2"]
    learn(manifest, km, *flags)
    model = load_kmeans(km)
    assert (model.num_clusters, model.dim) == (8, 64)
    assert model.metadata["feature_source"]["frame_rate_hz"] == 50.0
    for rank in range(2):
        dump(manifest, km, str(tmp / "lab"), *flags, "--nshard", "2", "--rank", str(rank))
    merge_km_shards.main(["--manifest", manifest, "--label-dir", str(tmp / "lab"), "--nshard", "2",
                          "--label-rate-hz", "50", "--no-progress"])
    labels = list(load_km_labels(str(tmp / "lab" / "train.km")))
    assert [len(row) for row in labels] == [(len(t) + 1) // 2 for t in truth]
    assert max(int(row.max()) for row in labels) < 8
    dump(manifest, km, str(tmp / "whole"), *flags)
    whole = np.concatenate(list(load_km_labels(str(tmp / "whole" / "train.km"))))
    # Shards batch utterances differently through the model; labels may only differ at float ties.
    assert np.mean(whole == np.concatenate(labels)) > 0.99
