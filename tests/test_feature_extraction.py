"""Hidden-state extraction: the Python API (fbank, raw fbank, audio) and melhubert-extract-features."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

import melhubert_fairseq
from melhubert_fairseq.data.fbank import compute_fbank
from melhubert_fairseq.data.features import stack_frames
from melhubert_fairseq.data.manifest import read_manifest
from melhubert_fairseq.feature_reader import MelHubertFeatureReader, parse_layers
from melhubert_fairseq.tools.extract_features import main as extract_main
from helpers import checkpoint_without_stats

melhubert_fairseq.register_with_fairseq()  # fairseq knows the task, model and criteria by name


@pytest.fixture(scope="module")
def reader(tiny_checkpoint) -> MelHubertFeatureReader:
    """Reader of the session's tiny checkpoint (trained with mean 0.5 / std 2.0 recorded)."""
    return MelHubertFeatureReader(str(tiny_checkpoint))


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
    assert len(layers) == 3 and layers[0].shape == (3, 31, 64)  # layer 0 (input of layer 1), layers 1 and 2
    assert padding_mask.tolist() == [[i >= n for i in range(31)] for n in (31, 20, 9)]
    for row, x in enumerate(inputs):
        alone, _ = reader.hidden_states([x])
        for batched, single in zip(layers, alone):
            torch.testing.assert_close(batched[row, : len(x)], single[0], atol=1e-5, rtol=1e-5)


def test_waveform_input_is_normalised_with_the_checkpoint_stats(reader):
    rng = np.random.default_rng(1)
    waveforms = [rng.uniform(-0.3, 0.3, n).astype(np.float32) for n in (16000, 9000)]
    states, padding_mask = reader.hidden_states([reader.prepare_waveform(w) for w in waveforms])
    for row, waveform in enumerate(waveforms):
        expected_input = stack_frames((compute_fbank(waveform) - 0.5) / 2.0, 2)  # the checkpoint's mean/std
        np.testing.assert_allclose(reader.prepare_raw_fbank(compute_fbank(waveform)), expected_input, rtol=1e-6, atol=1e-6)
        expected, _ = reader.hidden_states([expected_input])
        assert int((~padding_mask[row]).sum()) == len(expected_input)
        for ours, theirs in zip(states, expected):
            torch.testing.assert_close(ours[row, : len(expected_input)], theirs[0], atol=1e-4, rtol=1e-4)
    # int16-scale integer audio is the same audio
    as_int16 = np.round(waveforms[0] * 2**15).astype(np.int16)
    np.testing.assert_array_equal(reader.prepare_waveform(as_int16), as_int16.astype(np.float32) / 2**15)


def test_waveform_input_without_recorded_stats_is_a_clear_error(tiny_checkpoint, tmp_path):
    no_stats = MelHubertFeatureReader(str(checkpoint_without_stats(tiny_checkpoint, tmp_path)))
    with pytest.raises(ValueError, match="does not record the corpus mean/std"):
        no_stats.prepare_waveform(np.zeros(16000, dtype=np.float32))
    # Manifest features are normalised on disk: they need no stats.
    assert no_stats.prepare(np.zeros((10, 40), dtype=np.float32)).shape == (5, 80)


def test_layer_selection():
    assert parse_layers("all", 12) == list(range(1, 13))  # as before layer 0 existed
    assert parse_layers("12,1,8,8", 12) == [1, 8, 12]
    assert parse_layers("0", 12) == [0]
    assert parse_layers("0,all", 12) == list(range(13))
    for bad in ("-1", "13", "first", ""):
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
            np.testing.assert_allclose(written, expected[layer], atol=1e-5, rtol=1e-5)


def test_cli_audio_without_stats_fails_before_writing(tiny_checkpoint, tmp_path):
    write_audio_dir(tmp_path / "audio")
    with pytest.raises(ValueError, match="does not record the corpus mean/std"):
        extract_main(["--checkpoint", str(checkpoint_without_stats(tiny_checkpoint, tmp_path)),
                      "--audio-dir", str(tmp_path / "audio"), "--out-dir", str(tmp_path / "feats")])
    assert not (tmp_path / "feats").exists()


def test_cli_layer0_is_the_input_of_the_first_transformer_layer(reader, tiny_checkpoint, tmp_path):
    waves = write_audio_dir(tmp_path / "audio")
    out = tmp_path / "feats"
    assert extract_main(["--checkpoint", str(tiny_checkpoint), "--audio-dir", str(tmp_path / "audio"),
                         "--out-dir", str(out), "--layers", "0", "--no-progress"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["layer0"]
    model = reader.model
    for rel, waveform in waves.items():
        # Independently: the frames of the numpy (kaldi-native-fbank) path, captured as they enter layer 1.
        frames = torch.from_numpy(reader.prepare_raw_fbank(compute_fbank(waveform)))[None]
        seen = []
        hook = model.encoder.layers[0].register_forward_hook(lambda m, args, output: seen.append(args[0]))
        with torch.no_grad():
            model.extract_features(frames)
        hook.remove()
        written = np.load(out / "layer0" / rel.replace(".wav", ".npy"))
        np.testing.assert_allclose(written, seen[0][0].numpy(), atol=1e-4, rtol=1e-4)
    # 'all' is still the transformer layers only, as before layer 0 existed
    assert extract_main(["--checkpoint", str(tiny_checkpoint), "--audio-dir", str(tmp_path / "audio"),
                         "--out-dir", str(out), "--layers", "all", "--no-progress"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["layer0", "layer1", "layer2"]


def test_waveform_bad_input_names_the_reason(reader):
    with pytest.raises(ValueError, match="waveform: sample rate is 8000 Hz, the model takes 16000 Hz"):
        reader.prepare_waveform(np.zeros(8000, dtype=np.float32), sample_rate=8000)
    with pytest.raises(ValueError, match=r"waveform: expected a float \(samples,\) waveform.*shape \(2, 8000\)"):
        reader.prepare_waveform(np.zeros((2, 8000), dtype=np.float32))
    with pytest.raises(ValueError, match="expected a float.*complex64"):
        reader.prepare_waveform(np.zeros(8000, dtype=np.complex64))
    with pytest.raises(ValueError, match="all frames .* or all waveforms"):
        reader.hidden_states([np.zeros(8000, np.float32), np.zeros((10, 80), np.float32)])


def test_cli_audio_at_another_sample_rate_is_a_one_line_error(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    (tmp_path / "audio").mkdir()
    soundfile.write(tmp_path / "audio" / "narrow.wav", np.zeros(8000, dtype=np.int16), 8000)
    monkeypatch.setattr("sys.argv", ["melhubert-extract-features", "--checkpoint", str(tiny_checkpoint),
                                     "--audio-dir", str(tmp_path / "audio"), "--out-dir", str(tmp_path / "feats"),
                                     "--no-progress"])
    assert extract_main() == 2  # as the console script runs it
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith("error: ") and "narrow.wav: sample rate is 8000 Hz" in error[-1]
    assert not list((tmp_path / "feats").rglob("*.npy"))
