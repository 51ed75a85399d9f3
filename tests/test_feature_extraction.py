"""Hidden-state extraction: the Python API (fbank, raw fbank, audio) and melhubert-extract-features."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

import melhubert_fairseq  # noqa: F401  (registers the plugin)
from melhubert_fairseq.data.fbank import compute_fbank
from melhubert_fairseq.data.features import stack_frames
from melhubert_fairseq.data.manifest import read_manifest
from melhubert_fairseq.feature_reader import MelHubertFeatureReader, parse_layers
from melhubert_fairseq.tools.extract_features import main as extract_main


@pytest.fixture(scope="module")
def reader(tiny_checkpoint) -> MelHubertFeatureReader:
    """Reader of the session's tiny checkpoint (trained with mean 0.5 / std 2.0 recorded)."""
    return MelHubertFeatureReader(str(tiny_checkpoint))


def checkpoint_without_stats(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    """A copy of the tiny checkpoint whose fbank stats are unknown (NaN)."""
    state = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    state["model"]["fbank_mean_std"].fill_(float("nan"))
    torch.save(state, tmp_path / "no_stats.pt")
    return tmp_path / "no_stats.pt"


def write_audio_dir(directory: Path, seconds=(0.61, 0.93), seed: int = 0):
    """16 kHz 16-bit wav files in nested folders; returns {relative path: float waveform as read back}."""
    rng = np.random.default_rng(seed)
    waves = {}
    for index, duration in enumerate(seconds):
        rel = f"spk{index}/utt{index}.wav"
        (directory / f"spk{index}").mkdir(parents=True, exist_ok=True)
        samples = (rng.standard_normal(int(16000 * duration)) * 3000).astype(np.int16)
        soundfile.write(directory / rel, samples, 16000, subtype="PCM_16")
        waves[rel] = samples.astype(np.float32) / 2**15
    return waves


def test_batched_states_match_single_utterances_and_report_padding(reader):
    rng = np.random.default_rng(0)
    fbanks = [rng.standard_normal((frames, 40)).astype(np.float32) for frames in (61, 40, 17)]
    inputs = [reader.prepare(f) for f in fbanks]
    assert [len(x) for x in inputs] == [31, 20, 9]  # 20 ms model: ceil(frames / 2)
    layers, padding_mask = reader.hidden_states(inputs)
    assert len(layers) == 2 and layers[0].shape == (3, 31, 64)
    assert padding_mask.tolist() == [[i >= n for i in range(31)] for n in (31, 20, 9)]
    for row, x in enumerate(inputs):
        alone, _ = reader.hidden_states([x])
        for batched, single in zip(layers, alone):
            torch.testing.assert_close(batched[row, : len(x)], single[0], atol=1e-5, rtol=1e-5)


def test_waveform_input_is_normalised_with_the_checkpoint_stats(reader):
    waveform = np.random.default_rng(1).uniform(-0.3, 0.3, 16000).astype(np.float32)
    expected_input = stack_frames((compute_fbank(waveform) - 0.5) / 2.0, 2)
    np.testing.assert_allclose(reader.prepare_waveform(waveform), expected_input, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(reader.prepare_raw_fbank(compute_fbank(waveform)), expected_input, rtol=1e-6, atol=1e-6)


def test_waveform_input_without_recorded_stats_is_a_clear_error(tiny_checkpoint, tmp_path):
    no_stats = MelHubertFeatureReader(str(checkpoint_without_stats(tiny_checkpoint, tmp_path)))
    with pytest.raises(ValueError, match="does not record the corpus mean/std"):
        no_stats.prepare_waveform(np.zeros(16000, dtype=np.float32))
    # Manifest features are normalised on disk: they need no stats.
    assert no_stats.prepare(np.zeros((10, 40), dtype=np.float32)).shape == (5, 80)


def test_layer_selection():
    assert parse_layers("all", 12) == list(range(1, 13))
    assert parse_layers("12,1,8,8", 12) == [1, 8, 12]
    for bad in ("0", "13", "first", ""):
        with pytest.raises(ValueError):
            parse_layers(bad, 12)


def test_cli_on_manifest_writes_each_requested_layer(reader, tiny_checkpoint, tmp_path):
    manifest_path = tiny_checkpoint.parent.parent / "data" / "train.tsv"
    out = tmp_path / "feats"
    args = ["--checkpoint", str(tiny_checkpoint), "--manifest", str(manifest_path), "--out-dir", str(out),
            "--layers", "2", "--no-progress"]
    assert extract_main(args) == 0
    manifest = read_manifest(str(manifest_path))
    assert not (out / "layer1").exists()
    assert sorted(p.name for p in (out / "layer2").iterdir()) == sorted(
        manifest.relative_path(i) for i in range(len(manifest))
    )
    for row, expected in reader.iter_manifest(str(manifest_path), layer=2):
        written = np.load(out / "layer2" / manifest.relative_path(row))
        assert written.shape == (-(-manifest.num_frames[row] // 2), 64) and written.dtype == np.float32
        np.testing.assert_array_equal(written, expected)
    with pytest.raises(FileExistsError):
        extract_main(args)
    assert extract_main(args + ["--overwrite", "--layers", "all"]) == 0
    assert len(list((out / "layer1").iterdir())) == len(manifest)


def test_cli_on_audio_folder_matches_the_api_and_lists_skips(reader, tiny_checkpoint, tmp_path, capsys):
    waves = write_audio_dir(tmp_path / "audio")
    soundfile.write(tmp_path / "audio" / "tiny.wav", np.zeros(300, dtype=np.int16), 16000)  # < one 25 ms window
    out = tmp_path / "feats"
    assert extract_main(["--checkpoint", str(tiny_checkpoint), "--audio-dir", str(tmp_path / "audio"),
                         "--out-dir", str(out), "--layers", "1,2", "--no-progress"]) == 0
    assert "skipped" in capsys.readouterr().err
    assert not (out / "layer1" / "tiny.npy").exists()
    for rel, waveform in waves.items():
        expected = reader.extract_batch([reader.prepare_waveform(waveform)])[0]
        for layer in (1, 2):
            written = np.load(out / f"layer{layer}" / rel.replace(".wav", ".npy"))
            np.testing.assert_allclose(written, expected[layer - 1], atol=1e-5, rtol=1e-5)


def test_cli_audio_without_stats_fails_before_writing(tiny_checkpoint, tmp_path):
    write_audio_dir(tmp_path / "audio")
    with pytest.raises(ValueError, match="does not record the corpus mean/std"):
        extract_main(["--checkpoint", str(checkpoint_without_stats(tiny_checkpoint, tmp_path)),
                      "--audio-dir", str(tmp_path / "audio"), "--out-dir", str(tmp_path / "feats")])
    assert not (tmp_path / "feats").exists()
