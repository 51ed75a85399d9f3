"""Manifests, labels, stacking, cropping and every bad input the dataset must reject."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from helpers import make_fbank_corpus, write_indexed_corpus
from melhubert_fairseq.data.fbank_label_dataset import FbankLabelDataset
from melhubert_fairseq.data.features import load_mean_std, stack_frames
from melhubert_fairseq.data.frame_rates import FrameRates, label_stride, subsample_labels
from melhubert_fairseq.data.labels import LabelLineFormatter, index_label_file, load_km_labels, parse_label_line, write_km
from melhubert_fairseq.data.manifest import read_manifest, write_manifest
from melhubert_fairseq.errors import InputError
from melhubert_fairseq.tasks.mel_hubert_pretraining import MelHubertPretrainingTask
from melhubert_fairseq.tasks.pretraining_config import MelHubertPretrainingConfig


def make_task(data: Path, **overrides) -> MelHubertPretrainingTask:
    cfg = MelHubertPretrainingConfig(data=str(data), label_dir=str(data), num_classes=1000, seed=3, **overrides)
    return MelHubertPretrainingTask(cfg)


def load(data: Path, **overrides) -> FbankLabelDataset:
    task = make_task(data, **overrides)
    task.load_dataset("train")
    return task.datasets["train"]


# --- manifests and label files -------------------------------------------------------------


def test_read_manifest_rows_and_paths(tmp_path):
    (tmp_path / "train.tsv").write_text("/data/root\na/b/u1.npy\t120\nu2.npy\t7\n")
    manifest = read_manifest(str(tmp_path / "train.tsv"))
    assert len(manifest) == 2
    assert manifest.full_path(0) == "/data/root/a/b/u1.npy"
    assert manifest.utterance_id(0) == "u1"
    assert manifest.num_frames.tolist() == [120, 7]
    assert manifest.describe(1).endswith("train.tsv:3 (u2)")


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "empty manifest"),
        ("/root\n", "empty manifest"),
        ("/root\nu1.npy 12\n", "train.tsv:2"),
        ("/root\nu1.npy\tx\n", "not an integer"),
        ("/root\nu1.npy\t0\n", "must be positive"),
    ],
)
def test_read_manifest_rejects_bad_files(tmp_path, content, message):
    (tmp_path / "train.tsv").write_text(content)
    with pytest.raises(InputError, match=message):
        read_manifest(str(tmp_path / "train.tsv"))


def test_a_relative_root_is_relative_to_the_manifest_folder_for_both_kinds(tmp_path, monkeypatch):
    from melhubert_fairseq.data.audio_manifest import read_audio_manifest

    data = tmp_path / "corpus"
    data.mkdir()
    (data / "train.tsv").write_text("feats\nu1.npy\t12\n")
    (data / "audio.tsv").write_text("wav\nu1.flac\t16000\n")
    monkeypatch.chdir(tmp_path)  # anywhere but the manifests' folder: the working directory plays no part
    assert read_manifest("corpus/train.tsv").full_path(0) == str(data / "feats" / "u1.npy")
    assert read_audio_manifest("corpus/audio.tsv")[0].full_path == str(data / "wav" / "u1.flac")


def test_training_refuses_an_audio_manifest_naming_the_tool_to_run(tmp_path):
    make_fbank_corpus(tmp_path, num_utts=2, num_classes=1000)
    (tmp_path / "train.tsv").write_text(".\nspk1/u1.flac\t16000\n")  # fairseq's wav2vec manifest layout
    with pytest.raises(InputError, match=r"train\.tsv:2 \(u1\): this is an audio manifest \(spk1/u1\.flac is audio and "
                       r"16000 its num_samples\): run melhubert-wav-to-fbank first"):
        load(tmp_path)


def test_write_manifest_refuses_to_overwrite_and_is_atomic(tmp_path):
    path = tmp_path / "train.tsv"
    write_manifest(str(path), "/root", [("u1.npy", 3)])
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_manifest(str(path), "/root", [("u2.npy", 4)])

    def failing_rows():
        yield ("u3.npy", 5)
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_manifest(str(path), "/root", failing_rows(), overwrite=True)
    assert path.read_text() == "/root\nu1.npy\t3\n"  # old manifest intact
    assert [p.name for p in tmp_path.iterdir()] == ["train.tsv"]  # no temp file left


@pytest.mark.parametrize("chunk", [1, 3, 7, 1 << 20])
def test_label_index_offsets_counts_any_chunking(tmp_path, chunk):
    path = tmp_path / "train.km"
    path.write_bytes(b"1 2 3\n40 5\n6\n7 8 9 10")
    index = index_label_file(str(path), chunk_bytes=chunk)
    assert index.counts.tolist() == [3, 2, 1, 4]
    assert [index.read(i).tolist() for i in range(4)] == [[1, 2, 3], [40, 5], [6], [7, 8, 9, 10]]


@pytest.mark.parametrize(
    "line, labels",
    [(b"1 2 3\n", [1, 2, 3]), (b"\n", []), (b"", []), (b" 4\t5\r\n", [4, 5]), (b"-1 7", [-1, 7])],
)
def test_parse_label_line(line, labels):
    assert parse_label_line(line, "x").tolist() == labels


@pytest.mark.parametrize("line, bad", [(b"1 x 3", "'x'"), (b"1.5 2", "'1.5'"), (b"4 5 6abc", "'6abc'")])
def test_parse_label_line_names_the_bad_token(line, bad):
    with pytest.raises(InputError, match=f"train.km:4: label {bad} is not an integer"):
        parse_label_line(line, "train.km:4")


def test_write_km_lines_are_fairseqs_and_read_back_for_any_label_and_dtype(tmp_path):
    # A K smaller than the labels (the string table grows), int32/uint16 rows and an empty row.
    rows = [np.array([3, 0, 700], np.int32), np.array([], np.int64), np.array([9, 65535], np.uint16)]
    path = tmp_path / "train.km"
    assert write_km(str(path), rows, num_classes=4) == 3
    assert path.read_bytes() == b"3 0 700\n\n9 65535\n"
    assert [row.tolist() for row in load_km_labels(str(path))] == [row.tolist() for row in rows]


def test_label_line_formatter_refuses_a_negative_label():
    # Unchecked, -1 would index the string table from its end and write the largest label.
    with pytest.raises(ValueError, match="negative label -1"):
        LabelLineFormatter(8)(np.array([2, -1]))


# --- stacking and label subsampling ----------------------------------------------------------


def test_stack_frames_pairs_consecutive_frames_and_zero_pads_odd_tail():
    feats = np.arange(5 * 3, dtype=np.float32).reshape(5, 3)
    stacked = stack_frames(feats, 2)
    assert stacked.shape == (3, 6)
    np.testing.assert_array_equal(stacked[0], np.concatenate([feats[0], feats[1]]))
    np.testing.assert_array_equal(stacked[2], np.concatenate([feats[4], np.zeros(3)]))
    assert stack_frames(feats, 4).shape == (2, 12)
    assert stack_frames(feats, 1) is feats


def test_subsample_labels_takes_label_of_first_frame_of_each_stack():
    labels = np.arange(7)
    assert subsample_labels(labels, 2).tolist() == [0, 2, 4, 6]
    assert len(subsample_labels(labels, 2)) == len(stack_frames(np.zeros((7, 1)), 2))


def test_frame_rates_validation():
    assert FrameRates.from_config(2, 100).labels_per_model_frame_step == 2
    assert FrameRates.from_config(2, 50).labels_per_model_frame_step == 1
    assert FrameRates.from_config(4, 50).labels_per_model_frame_step == 2
    with pytest.raises(InputError, match="label_rate=50"):
        FrameRates.from_config(1, 50)  # 20 ms labels cannot feed a 10 ms model
    with pytest.raises(InputError, match="label_rate=30"):
        FrameRates.from_config(2, 30)


def test_label_stride_accepts_100_hz_over_an_integer_only():
    # 100 / 11 Hz (a model stacking 11 frames) is 11 although 100 / (100 / 11) is not exactly 11.0 in floats.
    assert [label_stride(rate) for rate in (100, 50, 25, 100 / 3, 100 / 11)] == [1, 2, 4, 3, 11]
    for rate in (30, 33.3, 200, 0, -50):
        with pytest.raises(InputError, match="not 100 Hz divided by an integer"):
            label_stride(rate)


# --- the dataset: alignment, cropping, padding -----------------------------------------------


@pytest.mark.parametrize("stack", [1, 2, 4])
def test_crops_keep_features_and_labels_aligned(tmp_path, stack):
    lengths = [300, 256, 180]  # multiples of 4: no zero-padded tail here (tested below)
    data = write_indexed_corpus(tmp_path, lengths)
    dataset = load(data, stack_frames=stack, max_sample_size=40, random_crop=True)
    for epoch in (1, 2):
        dataset.set_epoch(epoch)
        batch = dataset.collater([dataset[i] for i in range(len(dataset))])
        source, target = batch["net_input"]["source"], batch["target"]
        assert source.shape == (3, 40, 40 * stack)
        assert not batch["net_input"]["padding_mask"].any()
        # frame value = 10 ms frame index; its label = same index: stacked frame t starts at label t*stack
        first_frame_of_stack = source[:, :, 0]
        np.testing.assert_array_equal(first_frame_of_stack.numpy(), target.numpy().astype(np.float32))
        if stack > 1:  # second sub-frame is the next 10 ms frame
            np.testing.assert_array_equal(source[:, :, 40].numpy(), first_frame_of_stack.numpy() + 1)


def test_crop_is_reproducible_from_seed_epoch_and_index(tmp_path):
    data = write_indexed_corpus(tmp_path, [400, 400])
    first = load(data, max_sample_size=30)
    second = load(data, max_sample_size=30)
    starts = lambda ds: [ds.collater([ds[i]])["target"][0, 0].item() for i in range(2)]
    assert starts(first) == starts(second)
    second.set_epoch(2)
    assert starts(first) != starts(second)


def test_odd_length_utterance_last_stacked_frame_is_zero_padded(tmp_path):
    data = write_indexed_corpus(tmp_path, [7])
    dataset = load(data, stack_frames=2)
    batch = dataset.collater([dataset[0]])
    source = batch["net_input"]["source"][0]
    assert source.shape == (4, 80)
    assert batch["target"][0].tolist() == [0, 2, 4, 6]
    assert source[3, 0].item() == 6 and (source[3, 40:] == 0).all()


def test_pad_audio_pads_to_longest_with_padding_mask(tmp_path):
    data = write_indexed_corpus(tmp_path, [50, 31])
    dataset = load(data, stack_frames=2, pad_audio=True)
    batch = dataset.collater([dataset[0], dataset[1]])
    mask = batch["net_input"]["padding_mask"]
    assert batch["net_input"]["source"].shape == (2, 25, 80)
    assert mask[1].sum().item() == 25 - 16 and not mask[0].any()
    assert (batch["net_input"]["source"][1, 16:] == 0).all()
    assert batch["ntokens"] == 25 + 16


def test_labels_at_model_rate_with_one_frame_rounding(tmp_path):
    # 20 ms labels (stage 2): 7 fbank frames -> 4 model frames; a dump with 3 labels is accepted.
    feat_dir = tmp_path / "feats"
    feat_dir.mkdir()
    np.save(feat_dir / "a.npy", np.zeros((7, 40), np.float32))
    np.save(feat_dir / "b.npy", np.zeros((8, 40), np.float32))
    (tmp_path / "train.tsv").write_text(f"{feat_dir}\na.npy\t7\nb.npy\t8\n")
    (tmp_path / "train.km").write_text("1 2 3\n4 5 6 7\n")
    dataset = load(tmp_path, stack_frames=2, label_rate=50)
    assert dataset.sizes.tolist() == [3, 4]


def test_min_and_max_keep_size_filter_with_counts(tmp_path, caplog):
    data = write_indexed_corpus(tmp_path, [20, 100, 300])
    with caplog.at_level("INFO"):
        dataset = load(data, stack_frames=2, min_sample_size=20, max_keep_size=100)
    assert dataset.sizes.tolist() == [50]
    assert "skipping 1 utterances shorter than 20" in caplog.text
    assert "skipping 1 utterances longer than 100" in caplog.text


def test_float16_features_are_accepted(tmp_path):
    data = write_indexed_corpus(tmp_path, [30])
    path = tmp_path / "feats" / "u0.npy"
    np.save(path, np.load(path).astype(np.float16))
    batch = load(data, stack_frames=1).collater([{"id": 0}])
    assert batch["net_input"]["source"].dtype.is_floating_point
    assert batch["net_input"]["source"][0, 10, 0].item() == 10


def test_mean_std_normalisation_applied_at_load(tmp_path):
    data = write_indexed_corpus(tmp_path, [30])
    stats = np.stack([np.full(40, 2.0), np.full(40, 4.0)]).astype(np.float32)
    np.save(tmp_path / "ms.npy", stats)
    batch = load(data, stack_frames=1, mean_std_path=str(tmp_path / "ms.npy")).collater([{"id": 0}])
    assert batch["net_input"]["source"][0, 10, 0].item() == pytest.approx((10 - 2) / 4)


def test_index_memory_is_compact(tmp_path):
    data = write_indexed_corpus(tmp_path, [20] * 200)
    dataset = load(data, stack_frames=1)
    index_bytes = (
        dataset.manifest.path_bytes.nbytes
        + dataset.manifest.path_offsets.nbytes
        + dataset.manifest.num_frames.nbytes
        + dataset.manifest.line_numbers.nbytes
        + dataset.label_offsets.nbytes
        + dataset.sizes.nbytes
    )
    assert index_bytes / len(dataset) < 100


# --- bad input: each names the file/utterance and fails before training ----------------------


def test_label_count_mismatch_names_utterance_and_both_lengths(tmp_path):
    data = write_indexed_corpus(tmp_path, [30, 40])
    lines = (tmp_path / "train.km").read_text().splitlines()
    lines[1] = " ".join(lines[1].split()[:-2])
    (tmp_path / "train.km").write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=r"train.tsv:3 \(u1\): 40 frames -> expected 40 labels, .*train.km:2 has 38"):
        load(data)


def test_km_line_count_must_match_manifest(tmp_path):
    data = write_indexed_corpus(tmp_path, [30, 40])
    (tmp_path / "train.km").write_text((tmp_path / "train.km").read_text().splitlines()[0] + "\n")
    with pytest.raises(InputError, match="train.km has 1 lines but manifest .*train.tsv has 2"):
        load(data)


def test_label_outside_class_range_names_utterance(tmp_path):
    data = write_indexed_corpus(tmp_path, [30])
    task = MelHubertPretrainingTask(MelHubertPretrainingConfig(data=str(data), label_dir=str(data), num_classes=20, seed=1, stack_frames=1))
    task.load_dataset("train")
    with pytest.raises(InputError, match=r"\(u0\).*label 20 outside \[0, 20\)"):
        task.datasets["train"].collater([{"id": 0}])


def test_negative_label_is_rejected(tmp_path):
    data = write_indexed_corpus(tmp_path, [5])
    (tmp_path / "train.km").write_text("0 1 -2 3 4\n")
    dataset = load(data, stack_frames=1)
    with pytest.raises(InputError, match=r"label -2 outside"):
        dataset.collater([{"id": 0}])


def test_wrong_feature_dimension_is_reported_at_load(tmp_path):
    data = write_indexed_corpus(tmp_path, [30], dim=80)
    with pytest.raises(InputError, match=r"u0\).*shape \(30, 80\), expected \(frames, 40\)"):
        load(data)


def test_nan_in_crop_names_utterance_and_frame(tmp_path):
    data = write_indexed_corpus(tmp_path, [30, 30])
    feats = np.load(tmp_path / "feats" / "u1.npy")
    feats[12, 3] = np.nan
    np.save(tmp_path / "feats" / "u1.npy", feats)
    dataset = load(data, stack_frames=1)
    with pytest.raises(InputError, match=r"\(u1\).*NaN/Inf \(first at frame 12\)"):
        dataset.collater([{"id": 1}])


def test_inf_in_crop_is_rejected(tmp_path):
    data = write_indexed_corpus(tmp_path, [30])
    feats = np.load(tmp_path / "feats" / "u0.npy")
    feats[0, 0] = np.inf
    np.save(tmp_path / "feats" / "u0.npy", feats)
    with pytest.raises(InputError, match="NaN/Inf"):
        load(data, stack_frames=1)


def test_missing_feature_file_names_utterance(tmp_path):
    data = write_indexed_corpus(tmp_path, [30, 30])
    (tmp_path / "feats" / "u1.npy").unlink()
    dataset = load(data, stack_frames=1)
    with pytest.raises(FileNotFoundError, match=r"\(u1\): feature file .*u1.npy is missing"):
        dataset.collater([{"id": 1}])


def test_truncated_feature_file_names_utterance(tmp_path):
    data = write_indexed_corpus(tmp_path, [30])
    path = tmp_path / "feats" / "u0.npy"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(InputError, match=r"\(u0\): cannot read .*u0.npy \(truncated"):
        load(data, stack_frames=1)


def test_frame_count_disagreeing_with_manifest_is_rejected(tmp_path):
    data = write_indexed_corpus(tmp_path, [30])
    np.save(tmp_path / "feats" / "u0.npy", np.zeros((31, 40), np.float32))
    with pytest.raises(InputError, match=r"has 31 frames but the manifest says 30"):
        load(data, stack_frames=1)


def test_empty_manifest_is_rejected(tmp_path):
    (tmp_path / "train.tsv").write_text("/root\n")
    (tmp_path / "train.km").write_text("")
    with pytest.raises(InputError, match="empty manifest"):
        load(tmp_path)


def test_num_classes_must_agree_with_dictionary(tmp_path):
    data = write_indexed_corpus(tmp_path, [30])
    (tmp_path / "dict.km.txt").write_text("".join(f"{k} 1\n" for k in range(64)))
    with pytest.raises(InputError, match="num_classes=1000 but .*dict.km.txt lists 64"):
        make_task(data)
    task = MelHubertPretrainingTask(MelHubertPretrainingConfig(data=str(data), label_dir=str(data), num_classes=-1, seed=1))
    assert task.num_classes == 64


def test_mean_std_file_validation(tmp_path):
    np.save(tmp_path / "bad.npy", np.zeros((3, 40), np.float32))
    with pytest.raises(InputError, match=r"expected shape \(2, dim\)"):
        load_mean_std(str(tmp_path / "bad.npy"))
    np.save(tmp_path / "zero.npy", np.stack([np.zeros(40), np.zeros(40)]).astype(np.float32))
    with pytest.raises(InputError, match="std must be positive"):
        load_mean_std(str(tmp_path / "zero.npy"))


def test_atomic_outputs_get_normal_file_permissions(tmp_path):
    import os

    path = tmp_path / "train.tsv"
    write_manifest(str(path), "/root", [("u1.npy", 3)])
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_parse_label_line_leaves_other_threads_warnings_alone():
    """fairseq parses labels in a prefetch thread: that must not turn the main thread's warnings into errors."""
    import threading
    import warnings

    lines = [b"1 2 3\n", b"-1 7\n", b" 4\t5\r\n"] * 2000
    stop = threading.Event()

    def parse_forever():
        while not stop.is_set():
            for line in lines:
                parse_label_line(line, "x")

    worker = threading.Thread(target=parse_forever)
    worker.start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(20000):
                warnings.warn("main-thread warning", FutureWarning)
    finally:
        stop.set()
        worker.join()


@pytest.mark.parametrize("row", ["../feats/u1.npy", "a/../../u1.npy", "ABSOLUTE", "."])
def test_feature_and_audio_manifests_refuse_rows_outside_their_root(tmp_path, row):
    """The one row check, in the one manifest reader: training, k-means, extraction and wav-to-fbank alike."""
    from melhubert_fairseq.data.manifest import AUDIO, iter_tsv_manifest, read_manifest

    row = str(tmp_path / "u1.npy") if row == "ABSOLUTE" else row
    manifest = tmp_path / "train.tsv"
    manifest.write_text(f"{tmp_path}\nok.npy\t10\n{row}\t10\n")
    with pytest.raises(InputError, match=r"train\.tsv:3 \(.*\): path .* must stay below its root folder"):
        read_manifest(str(manifest))
    with pytest.raises(InputError, match=r"train\.tsv:3 \(.*\): path .* must stay below its root folder"):
        MelHubertPretrainingTask(
            MelHubertPretrainingConfig(data=str(tmp_path), label_dir=str(tmp_path), num_classes=4, seed=1)
        ).load_dataset("train")  # training
    manifest.write_text(f"{tmp_path}\nok.wav\t10\n{row.replace('.npy', '.wav')}\t10\n")
    with pytest.raises(InputError, match=r"train\.tsv:3 \(.*\): path .* must stay below its root folder"):
        list(iter_tsv_manifest(str(manifest), AUDIO))


def task_on(data: Path, **overrides) -> MelHubertPretrainingTask:
    """The task on a make_fbank_corpus folder (K = 32)."""
    return MelHubertPretrainingTask(MelHubertPretrainingConfig(data=str(data), label_dir=str(data), num_classes=32, seed=3, **overrides))


def _record(data: Path, split: str, normalized: bool, stats: np.ndarray, stats_name: str) -> str:
    """What the feature tools write: ``{split}.features.json`` and the statistics it names."""
    from melhubert_fairseq.data.features import FeatureNormalization, normalization_record_path

    np.save(data / stats_name, stats.astype(np.float32))
    manifest = str(data / f"{split}.tsv")
    FeatureNormalization(normalized, str(data / stats_name), "test").write(normalization_record_path(manifest), manifest)
    return str(data / stats_name)


def test_training_checks_the_recorded_normalisation_and_stores_those_statistics(tmp_path):
    data = make_fbank_corpus(tmp_path / "data", num_utts=3)
    raw_stats = np.stack([np.full(40, 15.5), np.full(40, 3.7)])
    raw = _record(data, "train", False, raw_stats, "train.mean-std.npy")
    with pytest.raises(InputError, match=rf"train\.features\.json: the features of train\.tsv are raw log-Mel.*"
                                         rf"task\.mean_std_path={re.escape(raw)}"):
        task_on(data).load_dataset("train")
    task = task_on(data, mean_std_path=raw)
    task.load_dataset("train")
    np.testing.assert_array_equal(task.training_feature_stats().mean, raw_stats[0])

    normalised_by = _record(data, "train", True, np.stack([np.full(40, 0.5), np.full(40, 2.0)]), "mean-std.npy")
    with pytest.raises(InputError, match="already normalised .* would normalise them twice"):
        task_on(data, mean_std_path=normalised_by).load_dataset("train")
    task = task_on(data)
    task.load_dataset("train")
    np.testing.assert_array_equal(task.training_feature_stats().std, np.full(40, 2.0, np.float32))
    # A valid split normalised with other statistics than the training split.
    make_fbank_corpus(data, num_utts=3, split="valid")
    _record(data, "valid", True, np.stack([np.full(40, 0.1), np.full(40, 1.0)]), "other.npy")
    with pytest.raises(InputError, match=r"valid\.tsv is normalised by .*other\.npy, the training split by"):
        task_on(data).load_dataset("valid")


def test_a_folder_without_a_record_keeps_working_and_plainly_raw_features_are_refused(tmp_path):
    data = make_fbank_corpus(tmp_path / "data", num_utts=3)  # features ~ N(0, 1): normalised
    np.save(data / "mean-std.npy", np.stack([np.full(40, 15.5), np.full(40, 3.7)]).astype(np.float32))
    task = task_on(data)
    task.load_dataset("train")  # as before: {data}/mean-std.npy holds the statistics they were normalised with
    np.testing.assert_array_equal(task.training_feature_stats().mean, np.full(40, 15.5, np.float32))
    # What an earlier `melhubert-wav-to-fbank --no-normalize` left: raw log-Mel beside a mean-std.npy.
    feats = Path(read_manifest(str(data / "train.tsv")).root)
    for path in feats.glob("*.npy"):
        np.save(path, np.load(path) * 3.7 + 15.5)
    with pytest.raises(InputError, match=r"train\.tsv: its features look raw \(mean 15\.\d.*pass task\.mean_std_path="):
        task_on(data).load_dataset("train")
    task_on(data, mean_std_path=str(data / "mean-std.npy")).load_dataset("train")


def test_a_missing_label_dir_is_an_error_not_task_data(tmp_path):
    data = make_fbank_corpus(tmp_path / "data", num_utts=3)  # train.km beside the features: no fallback to it
    with pytest.raises(InputError, match=r"task\.label_dir is not set: name the folder holding \{split\}\.km"):
        MelHubertPretrainingTask(MelHubertPretrainingConfig(data=str(data), num_classes=32, seed=3))
    # A model loaded from a checkpoint (fine-tuning, feature extraction) needs no labels.
    MelHubertPretrainingTask(MelHubertPretrainingConfig(data=str(data), num_classes=32, seed=3), from_checkpoint=True)
