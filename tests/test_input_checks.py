"""The shared input checks: feature .npy files, mean/std, audio files, and the one-line user error."""
from __future__ import annotations

import os
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile

from melhubert_fairseq.cli import console_main
from melhubert_fairseq.data.audio_manifest import list_audio_dir
from melhubert_fairseq.data.fbank import load_audio
from melhubert_fairseq.data.features import (
    MeanStd,
    load_mean_std,
    mean_std_from_sums,
    open_feature_file,
    read_feature_file,
)
from melhubert_fairseq.data.fbank_label_dataset import FbankLabelDataset
from melhubert_fairseq.data.frame_rates import FrameRates
from melhubert_fairseq.data.labels import index_label_file
from melhubert_fairseq.data.manifest import read_manifest
from melhubert_fairseq.errors import InputError
from melhubert_fairseq.tools import wav_to_fbank


def save_raw_pickle(path: Path) -> None:
    path.write_bytes(pickle.dumps({"frames": [1, 2, 3]}))


def save_object_array(path: Path) -> None:
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)


def save_truncated(path: Path) -> None:
    np.save(path, np.zeros((30, 40), np.float32))
    path.write_bytes(path.read_bytes()[:-100])


BAD_FEATURES = {
    "int16": (lambda p: np.save(p, np.zeros((10, 40), np.int16)), r"dtype int16, expected float32 or float16"),
    "complex": (lambda p: np.save(p, np.zeros((10, 40), np.complex64)), r"dtype complex64, expected float32"),
    "1-D": (lambda p: np.save(p, np.zeros(40, np.float32)), r"shape \(40,\), expected \(frames, 40\)"),
    "3-D": (lambda p: np.save(p, np.zeros((2, 10, 40), np.float32)), r"shape \(2, 10, 40\), expected \(frames, 40\)"),
    "wrong dim": (lambda p: np.save(p, np.zeros((10, 39), np.float32)), r"shape \(10, 39\), expected \(frames, 40\)"),
    "0 frames": (lambda p: np.save(p, np.zeros((0, 40), np.float32)), r"has no frames"),
    "object array": (save_object_array, r"not a plain \.npy array: it holds pickled Python objects.*refusing to unpickle"),
    "raw pickle": (save_raw_pickle, r"not a plain \.npy array but a Python pickle; refusing to unpickle"),
    "truncated": (save_truncated, r"cannot read .*u\.npy \(truncated: .*4800 bytes, but the file holds 4700"),
    "not npy": (lambda p: p.write_text("hello"), r"cannot read .*u\.npy \(not a \.npy file"),
    "NaN": (lambda p: np.save(p, np.where(np.arange(400).reshape(10, 40) == 87, np.nan, 0).astype(np.float32)),
            r"1 frame\(s\) with NaN/Inf \(first at frame 2\)"),
    "folder": (lambda p: p.mkdir(), r"u\.npy is a folder, expected a regular feature file"),
    "FIFO": (lambda p: os.mkfifo(p), r"u\.npy is a FIFO \(named pipe\), expected a regular feature file"),
}


@pytest.mark.parametrize("case", list(BAD_FEATURES))
def test_bad_feature_files_are_refused_naming_the_row(tmp_path, case, hang_guard):
    write, message = BAD_FEATURES[case]
    path = tmp_path / "u.npy"
    write(path)
    with pytest.raises(InputError, match=message) as err:
        read_feature_file(str(path), "train.tsv:2 (u)", expected_dim=40)
    assert str(err.value).startswith("train.tsv:2 (u): ")
    assert "allow_pickle" not in str(err.value)  # our message, not numpy's advice to unpickle


def test_good_features_pass_and_the_header_check_reads_no_data(tmp_path):
    feats = np.random.default_rng(0).standard_normal((25, 40)).astype(np.float16)
    np.save(tmp_path / "u.npy", feats)
    mapped = open_feature_file(str(tmp_path / "u.npy"), "w", expected_dim=40, expected_frames=25)
    assert isinstance(mapped, np.memmap) and mapped.dtype == np.float16
    np.testing.assert_array_equal(read_feature_file(str(tmp_path / "u.npy"), "w"), feats.astype(np.float32))
    with pytest.raises(InputError, match=r"has 25 frames but the manifest says 26"):
        open_feature_file(str(tmp_path / "u.npy"), "w", expected_dim=40, expected_frames=26)


def test_training_refuses_a_fifo_in_place_of_features_instead_of_blocking(tmp_path, hang_guard):
    feats = tmp_path / "feats"
    feats.mkdir()
    np.save(feats / "u0.npy", np.zeros((30, 40), np.float32))
    os.mkfifo(feats / "u1.npy")
    (tmp_path / "train.tsv").write_text(f"{feats}\nu0.npy\t30\nu1.npy\t30\n")
    (tmp_path / "train.km").write_text(" ".join(["1"] * 30) + "\n" + " ".join(["2"] * 30) + "\n")
    dataset = FbankLabelDataset(
        read_manifest(str(tmp_path / "train.tsv")), index_label_file(str(tmp_path / "train.km")),
        feat_dim=40, rates=FrameRates.from_config(1, 100), num_classes=4,
    )
    with pytest.raises(InputError, match=r"train\.tsv:3 \(u1\): .*u1\.npy is a FIFO"):
        dataset.collater([{"id": 1}])


# --------------------------------------------------------------------------- mean/std
def test_a_tiny_std_is_refused_wherever_mean_std_is_made_or_read(tmp_path):
    mean, std = np.zeros(40), np.ones(40)
    std[7] = 1e-40
    np.save(tmp_path / "ms.npy", np.stack([mean, std]).astype(np.float32))
    with pytest.raises(InputError, match=r"ms\.npy: std must be positive and at least 1e-05.*7: 1e-40"):
        load_mean_std(str(tmp_path / "ms.npy"))
    with pytest.raises(InputError, match="std must be positive"):
        MeanStd(mean.astype(np.float32), std.astype(np.float32), "checkpoint fbank_mean_std")
    constant = np.full((100, 40), 3.0)
    with pytest.raises(InputError, match=r"corpus: std must be positive.*40 dims have less"):
        mean_std_from_sums(constant.sum(0), np.square(constant).sum(0), 100, "corpus")
    assert MeanStd(mean, np.full(40, 1e-3)).dim == 40


def test_wav_to_fbank_with_a_tiny_std_exits_2_and_writes_nothing(tmp_path, capsys):
    (tmp_path / "audio").mkdir()
    soundfile.write(tmp_path / "audio" / "a.flac", np.zeros(8000, np.float32), 16000)
    stats = np.stack([np.zeros(40), np.full(40, 1e-40)]).astype(np.float32)
    np.save(tmp_path / "ms.npy", stats)
    argv = ["--audio-dir", str(tmp_path / "audio"), "--out-dir", str(tmp_path / "out"), "--mean-std", str(tmp_path / "ms.npy")]
    assert run_console(wav_to_fbank.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "std must be positive" in err[-1]
    assert not (tmp_path / "out").exists()


def run_console(main, argv):
    """Run a console entry point as the command line does (argv from sys.argv)."""
    saved = sys.argv
    sys.argv = ["tool", *argv]
    try:
        return main()
    finally:
        sys.argv = saved


# --------------------------------------------------------------------------- audio
def test_a_truncated_wav_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "cut.wav"
    soundfile.write(path, np.zeros(16000, np.int16), 16000, subtype="PCM_16")
    path.write_bytes(path.read_bytes()[:16000])  # half the samples its header promises
    with pytest.raises(InputError, match=r"cut\.wav: truncated audio file: its header declares 32000 bytes"):
        load_audio(str(path))
    float_wav = tmp_path / "float.wav"
    soundfile.write(float_wav, np.zeros(16000, np.float32), 16000, subtype="FLOAT")
    float_wav.write_bytes(float_wav.read_bytes()[:-1000])
    with pytest.raises(InputError, match=r"float\.wav: truncated audio file"):
        load_audio(str(float_wav))
    padded = tmp_path / "padded.wav"  # trailing bytes after the data chunk are harmless
    soundfile.write(padded, np.zeros(16000, np.int16), 16000, subtype="PCM_16")
    padded.write_bytes(padded.read_bytes() + b"\0" * 64)
    assert load_audio(str(padded)).shape == (16000,)


def test_corrupt_flac_and_non_regular_audio_are_refused(tmp_path, hang_guard):
    flac = tmp_path / "bad.flac"
    soundfile.write(flac, np.random.default_rng(0).uniform(-0.5, 0.5, 16000), 16000, subtype="PCM_16")
    data = bytearray(flac.read_bytes())
    data[len(data) // 2 :] = bytes(len(data) - len(data) // 2)
    flac.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"bad\.flac: cannot read audio"):
        load_audio(str(flac))
    os.mkfifo(tmp_path / "pipe.wav")
    with pytest.raises(InputError, match=r"pipe\.wav is a FIFO"):
        load_audio(str(tmp_path / "pipe.wav"))


def test_symlinked_speaker_folders_under_audio_dir_are_followed_once(tmp_path):
    elsewhere = tmp_path / "disk2" / "spk2"
    elsewhere.mkdir(parents=True)
    soundfile.write(elsewhere / "b.flac", np.zeros(8000, np.float32), 16000)
    audio = tmp_path / "audio"
    (audio / "spk1").mkdir(parents=True)
    soundfile.write(audio / "spk1" / "a.flac", np.zeros(8000, np.float32), 16000)
    os.symlink(elsewhere, audio / "spk2")
    os.symlink(audio, audio / "spk1" / "loop")  # a link back up the tree is walked once, not forever
    items = list_audio_dir(str(audio))
    assert [item.relative_path for item in items] == ["spk1/a.flac", "spk2/b.flac"]


# --------------------------------------------------------------------------- the one-line error
def test_console_main_prints_one_error_line_for_input_errors(capsys, monkeypatch):
    @console_main
    def main(argv=None):
        raise InputError("train.tsv:3 (u1): first line\nsecond line")

    monkeypatch.setattr(sys, "argv", ["tool"])
    assert main() == 2
    assert capsys.readouterr().err == "error: train.tsv:3 (u1): first line second line\n"
    with pytest.raises(InputError):
        main([])  # with an argv list (tests, other tools) errors propagate


def test_label_parsing_leaves_warnings_of_other_threads_alone():
    """fairseq's prefetch thread parses labels while the training thread warns (e.g. autocast's
    FutureWarning): the parser must not turn the other thread's warnings into errors."""
    import threading
    import warnings

    from melhubert_fairseq.data.labels import parse_label_line

    lines = [b"1 2 3 4 5\n", b"7 -1 3\n", b"0 0 1\n"]
    stop = threading.Event()

    def parse_forever():
        while not stop.is_set():
            for line in lines:
                parse_label_line(line, "train.km:1")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        worker = threading.Thread(target=parse_forever)
        worker.start()
        try:
            deadline = time.perf_counter() + 1.0
            while time.perf_counter() < deadline:
                warnings.warn("the training thread's warning", FutureWarning)
        finally:
            stop.set()
            worker.join()
