"""Importing the original release's Kaldi dumps: features (CM/CM2/CM3/float/double), labels, manifests."""
from __future__ import annotations

import os

import kaldiio
import numpy as np
import pytest
from kaldiio.compression_header import kOneByteAuto, kSpeechFeature, kTwoByteAuto

from melhubert_fairseq.data.features import FeatureNormalization, load_mean_std, mean_std_from_sums
from melhubert_fairseq.data.labels import load_km_labels
from melhubert_fairseq.data.manifest import read_manifest
from melhubert_fairseq.tools import create_manifest, import_kaldi_features, import_kaldi_labels
from melhubert_fairseq.data.kaldi import read_mean_var
from melhubert_fairseq.errors import InputError

DIM = 40
K = 512
#: Directory the scp files claim the arks are in: it does not exist on this machine.
WRITTEN_DIR = "/nonexistent/original-machine/dump"
#: ark name -> (kaldiio compression_method, Kaldi matrix token it must produce).
ARK_FORMATS = {
    "raw_fbank.cm.ark": (kSpeechFeature, b"CM "),
    "raw_fbank.cm2.ark": (kTwoByteAuto, b"CM2 "),
    "raw_fbank.cm3.ark": (kOneByteAuto, b"CM3 "),
    "raw_fbank.float.ark": (None, b"FM "),
    "raw_fbank.double.ark": (None, b"DM "),
}


class Dump:
    """A synthetic Libri-360-style download: feature scp/arks, .mean-var, .bas label ark + scp."""

    def __init__(self, root, num_utts=10, seed=0):
        self.dir = root / "libri-360"
        self.dir.mkdir(parents=True)
        rng = np.random.default_rng(seed)
        self.utts = [f"{100 + i}-1234-{i:04d}" for i in range(num_utts)]
        self.feats = {}
        self.ark_of = {}
        for i, utt in enumerate(self.utts):
            frames = int(rng.integers(20, 60))
            # log-Mel-like: per-dim offsets, a few units of spread
            self.feats[utt] = (rng.normal(size=(frames, DIM)) * 2.0 + np.linspace(3, 12, DIM)).astype(np.float32)
            self.ark_of[utt] = list(ARK_FORMATS)[i % len(ARK_FORMATS)]
        self.labels = {utt: rng.integers(0, K, len(self.feats[utt])) for utt in self.utts}
        self.scp = self.dir / "train-clean-360.scp"
        self.mean_var = self.dir / "train-clean-360.mean-var"
        self.label_scp = self.dir / "train-clean-360-k512-e10.bas.scp"
        self.label_ark = self.dir / "train-clean-360-k512-e10.bas"
        self.write_features()
        self.write_mean_var()
        self.write_labels(self.labels)

    def write_features(self):
        """One ark per storage format; the scp lists utterances in self.utts order with foreign paths."""
        lines = {}
        for ark_name, (method, _) in ARK_FORMATS.items():
            utts = [u for u in self.utts if self.ark_of[u] == ark_name]
            local_scp = self.dir / f"{ark_name}.local.scp"
            with kaldiio.WriteHelper(f"ark,scp:{self.dir / ark_name},{local_scp}", compression_method=method) as writer:
                for utt in utts:
                    array = self.feats[utt].astype(np.float64) if "double" in ark_name else self.feats[utt]
                    writer(utt, array)
            for line in local_scp.read_text().splitlines():
                utt, spec = line.split(" ", 1)
                lines[utt] = f"{utt} {WRITTEN_DIR}/{ark_name}:{spec.rsplit(':', 1)[1]}"
            local_scp.unlink()
        self.scp.write_text("".join(lines[u] + "\n" for u in self.utts))

    def write_mean_var(self, dim=DIM):
        """The release's .mean-var: [sums], [sums of squares], frame count."""
        stacked = np.concatenate([self.feats[u] for u in self.utts]).astype(np.float64)[:, :dim]
        total, total_sq = stacked.sum(0), np.square(stacked).sum(0)
        self.mean_var.write_text(
            f"[{','.join(repr(float(x)) for x in total)}]\n[{','.join(repr(float(x)) for x in total_sq)}]\n{len(stacked)}\n"
        )
        self.stats = mean_std_from_sums(total, total_sq, len(stacked), "test")

    def write_labels(self, labels, order=None):
        """Text ark 'utt l1 l2 ...' with a scp whose offsets point just past 'utt '."""
        scp_lines, offset = [], 0
        with open(self.label_ark, "wb") as ark:
            for utt in order or list(labels):
                key = f"{utt} ".encode()
                ark.write(key)
                scp_lines.append(f"{utt} {WRITTEN_DIR}/{self.label_ark.name}:{offset + len(key)}\n")
                line = (" ".join(map(str, labels[utt])) + "\n").encode()
                ark.write(line)
                offset += len(key) + len(line)
        self.label_scp.write_text("".join(scp_lines))

    def ark_offset(self, utt):
        """Byte offset of ``utt`` in its ark, from the scp."""
        line = next(l for l in self.scp.read_text().splitlines() if l.startswith(utt + " "))
        return int(line.rsplit(":", 1)[1])


@pytest.fixture
def dump(tmp_path):
    return Dump(tmp_path)


def import_features(dump, out, *extra):
    return import_kaldi_features.main(
        ["--scp", str(dump.scp), "--mean-var", str(dump.mean_var), "--out-dir", str(out), *extra]
    )


def assert_nothing_written(out):
    """A failed run leaves the output folder absent or empty (no manifest, km, features or staging)."""
    assert not out.exists() or sorted(os.listdir(out)) == []


def test_fixture_covers_every_kaldi_matrix_format(dump):
    """Guard: the dump really holds CM, CM2, CM3, FM and DM matrices (kaldiio's methods could change)."""
    seen = set()
    for utt in dump.utts:
        raw = (dump.dir / dump.ark_of[utt]).read_bytes()
        offset = dump.ark_offset(utt)
        assert raw[offset : offset + 2] == b"\0B"
        token = ARK_FORMATS[dump.ark_of[utt]][1]
        assert raw[offset + 2 : offset + 2 + len(token)] == token
        seen.add(token)
    assert seen == {b"CM ", b"CM2 ", b"CM3 ", b"FM ", b"DM "}


def test_features_match_kaldi_values_normalised(dump, tmp_path):
    out = tmp_path / "out"
    written = import_features(dump, out)
    manifest = read_manifest(written["manifest"])
    assert [manifest.utterance_id(i) for i in range(len(manifest))] == dump.utts  # scp order
    stats = load_mean_std(str(out / "mean-std.npy"))
    np.testing.assert_allclose(stats.to_array(), dump.stats.to_array(), rtol=1e-6)
    for i, utt in enumerate(dump.utts):
        feats = np.load(manifest.full_path(i))
        assert feats.dtype == np.float32 and feats.shape == dump.feats[utt].shape
        assert manifest.num_frames[i] == len(feats)
        # Exactly what kaldiio decodes from the (possibly compressed) ark, normalised ...
        decoded = kaldiio.load_mat(f"{dump.dir / dump.ark_of[utt]}:{dump.ark_offset(utt)}")
        np.testing.assert_allclose(feats, (decoded - dump.stats.mean) / dump.stats.std, rtol=1e-5, atol=1e-5)
        # ... and, within the compression's own error (1-byte CM/CM3: ~0.03 std here), the values before compression.
        tolerance = {b"CM3 ": 0.06, b"CM ": 0.06}.get(ARK_FORMATS[dump.ark_of[utt]][1], 1e-3)
        expected = (dump.feats[utt] - dump.stats.mean) / dump.stats.std
        np.testing.assert_allclose(feats, expected, atol=tolerance)
    # Normalised by the corpus statistics: close to zero mean, unit std overall.
    everything = np.concatenate([np.load(manifest.full_path(i)) for i in range(len(manifest))])
    assert np.abs(everything.mean(0)).max() < 0.05 and np.abs(everything.std(0) - 1).max() < 0.05


def test_float16_and_workers_write_the_same_features(dump, tmp_path):
    import_features(dump, tmp_path / "a")
    import_features(dump, tmp_path / "b", "--dtype", "float16", "--workers", "2")
    for utt in dump.utts:
        ref = np.load(tmp_path / "a" / "train-clean-360" / f"{utt}.npy")
        half = np.load(tmp_path / "b" / "train-clean-360" / f"{utt}.npy")
        assert half.dtype == np.float16
        np.testing.assert_allclose(half.astype(np.float32), ref, atol=1e-2)
    assert (tmp_path / "a" / "train-clean-360.tsv").read_text().splitlines()[1:] == (
        tmp_path / "b" / "train-clean-360.tsv"
    ).read_text().splitlines()[1:]


def test_mean_std_npy_accepted_and_no_normalize(dump, tmp_path):
    import_features(dump, tmp_path / "a")
    import_kaldi_features.main(
        ["--scp", str(dump.scp), "--mean-var", str(tmp_path / "a" / "mean-std.npy"), "--out-dir", str(tmp_path / "b")]
    )
    utt = dump.utts[3]  # a float (uncompressed) matrix
    np.testing.assert_allclose(
        np.load(tmp_path / "b" / "train-clean-360" / f"{utt}.npy"),
        np.load(tmp_path / "a" / "train-clean-360" / f"{utt}.npy"),
        rtol=1e-6,
    )
    import_features(dump, tmp_path / "raw", "--no-normalize")
    np.testing.assert_array_equal(np.load(tmp_path / "raw" / "train-clean-360" / f"{utt}.npy"), dump.feats[utt])
    record = FeatureNormalization.read(str(tmp_path / "raw" / "train-clean-360.tsv"))
    assert record.mean_std == str(tmp_path / "raw" / "train-clean-360.mean-std.npy") and not record.normalized
    assert not (tmp_path / "raw" / "mean-std.npy").exists()


def test_ark_dir_option_and_missing_ark_names_utterance_and_paths(dump, tmp_path):
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    for name in ARK_FORMATS:
        (dump.dir / name).rename(moved / name)
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError) as err:
        import_features(dump, out)
    message = str(err.value)
    assert dump.utts[0] in message and f"{WRITTEN_DIR}/raw_fbank.cm.ark" in message
    assert str(dump.dir / "raw_fbank.cm.ark") in message
    assert_nothing_written(out)
    import_features(dump, out, "--ark-dir", str(moved))
    assert len(read_manifest(str(out / "train-clean-360.tsv"))) == len(dump.utts)


def _truncate_last_ark_entry(dump):
    ark = dump.dir / "raw_fbank.float.ark"
    ark.write_bytes(ark.read_bytes()[:-100])
    last = [u for u in dump.utts if dump.ark_of[u] == "raw_fbank.float.ark"][-1]
    return [last, "raw_fbank.float.ark", "truncated or corrupt"]


def _corrupt_matrix_header(dump):
    utt = dump.utts[0]
    ark = dump.dir / dump.ark_of[utt]
    raw = bytearray(ark.read_bytes())
    offset = dump.ark_offset(utt)
    raw[offset + 2 : offset + 4] = b"XQ"  # matrix type token
    ark.write_bytes(bytes(raw))
    return [utt, dump.ark_of[utt], "truncated or corrupt"]


def _add_nan(dump):
    utt = dump.utts[3]  # uncompressed float ark: NaN survives storage
    dump.feats[utt][5, 7] = np.nan
    dump.write_features()
    return [utt, "NaN/Inf", "frame 5"]


def _wrong_dim(dump):
    dump.write_mean_var(dim=39)
    return [dump.utts[0], "expected (frames, 39)", "the dim of", "mean-var"]


def _duplicate_id(dump):
    lines = dump.scp.read_text().splitlines()
    dump.scp.write_text("\n".join(lines + [lines[2]]) + "\n")
    return [dump.utts[2], "duplicate", "line 3"]


def _empty_scp(dump):
    dump.scp.write_text("\n")
    return [str(dump.scp), "empty scp"]


def _scp_points_into_wrong_ark(dump):
    lines = dump.scp.read_text().splitlines()
    utt, spec = lines[0].split(" ")
    lines[0] = f"{utt} {spec.replace('raw_fbank.cm.ark', 'raw_fbank.cm2.ark')}"
    dump.scp.write_text("\n".join(lines) + "\n")
    return [utt, "raw_fbank.cm2.ark", "do not match"]


def _bad_mean_var(dump):
    dump.mean_var.write_text("[1.0,2.0\n[1,2]\n10\n")
    return [f"{dump.mean_var}:1", "bracketed"]


@pytest.mark.parametrize(
    "corrupt",
    [
        _truncate_last_ark_entry,
        _corrupt_matrix_header,
        _add_nan,
        _wrong_dim,
        _duplicate_id,
        _empty_scp,
        _scp_points_into_wrong_ark,
        _bad_mean_var,
    ],
)
def test_bad_feature_dump_fails_naming_the_culprit_and_writes_nothing(dump, tmp_path, corrupt):
    expected = corrupt(dump)
    out = tmp_path / "out"
    with pytest.raises(InputError) as err:
        import_features(dump, out)
    for fragment in expected:
        assert fragment in str(err.value)
    assert_nothing_written(out)


def test_existing_outputs_need_overwrite(dump, tmp_path):
    out = tmp_path / "out"
    import_features(dump, out)
    before = (out / "train-clean-360.tsv").read_text()
    with pytest.raises(FileExistsError, match="--overwrite"):
        import_features(dump, out)
    dump.feats[dump.utts[3]] += 1.0
    dump.write_features()
    import_features(dump, out, "--overwrite")
    assert (out / "train-clean-360.tsv").read_text() == before
    assert sorted(os.listdir(out)) == ["mean-std.npy", "train-clean-360", "train-clean-360.features.json", "train-clean-360.tsv"]
    assert len(os.listdir(out / "train-clean-360")) == len(dump.utts)
    # A second split of the same corpus reuses the identical mean-std.npy without --overwrite.
    import_features(dump, out, "--split", "dev")
    assert (out / "dev.tsv").exists()


def import_labels(manifest, dump, *extra):
    return import_kaldi_labels.main(["--manifest", str(manifest), "--label-scp", str(dump.label_scp), *extra])


def test_labels_follow_manifest_order(dump, tmp_path):
    out = tmp_path / "out"
    import_features(dump, out)
    dump.write_labels(dump.labels, order=list(reversed(dump.utts)))  # ark order differs from manifest order
    written = import_labels(out / "train-clean-360.tsv", dump)
    rows = list(load_km_labels(written["labels"]))
    assert len(rows) == len(dump.utts)
    for row, utt in zip(rows, dump.utts):
        np.testing.assert_array_equal(row, dump.labels[utt])
    assert (out / "dict.km.txt").read_text().splitlines() == [f"{i} 1" for i in range(K)]
    assert "manifest" not in written  # every utterance matched: the manifest is kept as is


def test_kaldi_bracketed_text_ark_labels(dump, tmp_path):
    out = tmp_path / "out"
    import_features(dump, out)
    with kaldiio.WriteHelper(f"ark,t,scp:{dump.label_ark},{dump.label_scp}") as writer:
        for utt in dump.utts:
            writer(utt, dump.labels[utt].astype(np.int32))
    assert b"[" in dump.label_ark.read_bytes()
    written = import_labels(out / "train-clean-360.tsv", dump)
    np.testing.assert_array_equal(next(load_km_labels(written["labels"])), dump.labels[dump.utts[0]])


def test_stage2_labels_at_20ms_need_label_rate_50(dump, tmp_path):
    """Libri-960's stage2-cluster labels come from a 20 ms model: one label per two fbank frames."""
    out = tmp_path / "out"
    import_features(dump, out)
    halved = {utt: labels[::2] for utt, labels in dump.labels.items()}
    dump.write_labels(halved)
    with pytest.raises(InputError, match=r"labels but \d+ feature frames"):
        import_labels(out / "train-clean-360.tsv", dump)
    written = import_labels(out / "train-clean-360.tsv", dump, "--label-rate", "50", "--overwrite")
    for row, utt in zip(load_km_labels(written["labels"]), dump.utts):
        np.testing.assert_array_equal(row, halved[utt])


def _short_label_line(dump):
    utt = dump.utts[4]
    dump.labels[utt] = dump.labels[utt][:-3]
    dump.write_labels(dump.labels)
    n = len(dump.feats[utt])
    return [utt, f"{n - 3} labels", f"{n} feature frames"]


def _label_out_of_range(dump):
    utt = dump.utts[2]
    dump.labels[utt][7] = K
    dump.write_labels(dump.labels)
    return [utt, f"label {K} at frame 7", f"[0, {K})"]


def _non_integer_label(dump):
    utt = dump.utts[1]
    text = dump.label_ark.read_bytes()
    dump.label_ark.write_bytes(text.replace(f"{utt} {dump.labels[utt][0]} ".encode(), f"{utt} 1.5 ".encode(), 1))
    return [utt, "'1.5'", "not an integer"]


def _labels_missing_for_some(dump):
    missing = dump.utts[6:8]
    dump.write_labels({u: l for u, l in dump.labels.items() if u not in missing})
    return ["2 utterance(s)", *missing, "no labels", "--skip-missing"]


def _labels_without_features(dump):
    dump.write_labels({**dump.labels, "999-1-0000": np.zeros(30, dtype=int)})
    return ["1 utterance(s)", "999-1-0000", "no features"]


@pytest.mark.parametrize(
    "corrupt",
    [_short_label_line, _label_out_of_range, _non_integer_label, _labels_missing_for_some, _labels_without_features],
)
def test_bad_labels_fail_naming_the_utterance_and_write_no_km(dump, tmp_path, corrupt):
    out = tmp_path / "out"
    import_features(dump, out)
    expected = corrupt(dump)
    manifest_before = (out / "train-clean-360.tsv").read_text()
    with pytest.raises(InputError) as err:
        import_labels(out / "train-clean-360.tsv", dump)
    for fragment in expected:
        assert fragment in str(err.value)
    assert not (out / "train-clean-360.km").exists() and not (out / "dict.km.txt").exists()
    assert (out / "train-clean-360.tsv").read_text() == manifest_before
    assert [n for n in os.listdir(out) if n.startswith(".")] == []


def test_skip_missing_labels_writes_matched_manifest_and_lists_drops(dump, tmp_path, capsys):
    out = tmp_path / "out"
    import_features(dump, out)
    _labels_missing_for_some(dump)
    labels_dir = tmp_path / "labels"
    written = import_labels(out / "train-clean-360.tsv", dump, "--skip-missing", "--out-dir", str(labels_dir))
    kept = [u for u in dump.utts if u not in dump.utts[6:8]]
    manifest = read_manifest(written["manifest"])
    assert [manifest.utterance_id(i) for i in range(len(manifest))] == kept
    assert manifest.root == str(out / "train-clean-360")
    for row, utt in zip(load_km_labels(written["labels"]), kept):
        np.testing.assert_array_equal(row, dump.labels[utt])
    assert (labels_dir / "train-clean-360.dropped.txt").read_text() == "".join(
        f"{u}\tno labels\n" for u in dump.utts[6:8]
    )
    stderr = capsys.readouterr().err
    assert "2 utterance(s)" in stderr and dump.utts[6] in stderr and dump.utts[7] in stderr
    # The input manifest is never rewritten in place, also with --overwrite (one rule for every tool).
    before = (out / "train-clean-360.tsv").read_bytes()
    for extra in ([], ["--overwrite"]):
        with pytest.raises(InputError, match=r"train-clean-360\.tsv: this output is an input of the run"):
            import_labels(out / "train-clean-360.tsv", dump, "--skip-missing", *extra)
    assert (out / "train-clean-360.tsv").read_bytes() == before


def test_create_manifest_from_npy_folders(tmp_path):
    rng = np.random.default_rng(1)
    feature_dir, label_dir = tmp_path / "feature", tmp_path / "cluster"
    feature_dir.mkdir()
    label_dir.mkdir()
    lengths = {"a-1-0001": 30, "a-1-0002": 45, "b-2-0001": 12}
    labels = {}
    for utt, n in lengths.items():
        np.save(feature_dir / f"{utt}.npy", rng.normal(size=(n, DIM)).astype(np.float32))
        labels[utt] = rng.integers(0, K, n)
        np.save(label_dir / f"{utt}.npy", labels[utt])
    out = tmp_path / "data"
    written = create_manifest.main(
        ["--feature-dir", str(feature_dir), "--label-dir", str(label_dir), "--out-dir", str(out), "--split", "train"]
    )
    manifest = read_manifest(written["manifest"])
    assert manifest.root == str(feature_dir)
    assert [manifest.relative_path(i) for i in range(len(manifest))] == [f"{u}.npy" for u in sorted(lengths)]
    assert manifest.num_frames.tolist() == [lengths[u] for u in sorted(lengths)]
    for row, utt in zip(load_km_labels(written["labels"]), sorted(lengths)):
        np.testing.assert_array_equal(row, labels[utt])

    # A label with the wrong length and a missing label file: errors name the utterance, nothing written.
    np.save(label_dir / "a-1-0002.npy", labels["a-1-0002"][:-1])
    with pytest.raises(InputError, match=r"a-1-0002 has 44 labels but 45 feature frames"):
        create_manifest.main(["--feature-dir", str(feature_dir), "--label-dir", str(label_dir), "--out-dir", str(tmp_path / "bad")])
    assert_nothing_written(tmp_path / "bad")
    os.unlink(label_dir / "a-1-0002.npy")
    with pytest.raises(InputError, match=r"1 utterance\(s\) .* no labels .*: a-1-0002"):
        create_manifest.main(["--feature-dir", str(feature_dir), "--label-dir", str(label_dir), "--out-dir", str(tmp_path / "bad")])
    assert_nothing_written(tmp_path / "bad")
    written = create_manifest.main(
        ["--feature-dir", str(feature_dir), "--label-dir", str(label_dir), "--out-dir", str(tmp_path / "skip"), "--skip-missing"]
    )
    assert read_manifest(written["manifest"]).num_frames.tolist() == [30, 12]
    assert (tmp_path / "skip" / "feature.dropped.txt").read_text() == "a-1-0002\tno labels\n"


def test_create_manifest_rejects_inconsistent_feature_dims(tmp_path):
    feature_dir = tmp_path / "feature"
    feature_dir.mkdir()
    np.save(feature_dir / "u1.npy", np.zeros((5, DIM), np.float32))
    np.save(feature_dir / "u2.npy", np.zeros((5, DIM + 1), np.float32))
    with pytest.raises(InputError, match=r"u2 has 41-dim features but u1.npy has 40"):
        create_manifest.main(["--feature-dir", str(feature_dir), "--out-dir", str(tmp_path / "out")])
    assert_nothing_written(tmp_path / "out")


def test_read_mean_var_accepts_spaces_and_matches_sums(tmp_path):
    path = tmp_path / "x.mean-var"
    path.write_text("[ 2.0, 4.0 ]\n[4.0 10.0]\n2\n")
    stats = read_mean_var(str(path))
    np.testing.assert_allclose(stats.mean, [1.0, 2.0])
    np.testing.assert_allclose(stats.std, [1.0, 1.0])
