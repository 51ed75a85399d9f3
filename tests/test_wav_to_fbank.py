"""Waveform -> Kaldi fbank (melhubert_fairseq.data.fbank), tools/wav_to_fbank.py and the demo corpus."""
import os

import kaldi_native_fbank as knf
import numpy as np
import pytest
import soundfile

from melhubert_fairseq.data.audio_manifest import read_audio_manifest
from melhubert_fairseq.data.fbank import (
    compute_fbank,
    fbank_options,
    load_audio,
    num_fbank_frames,
)
from melhubert_fairseq.data.features import FeatureNormalization, load_mean_std
from melhubert_fairseq.data.manifest import read_manifest
from melhubert_fairseq.errors import InputError
from melhubert_fairseq.tools import make_demo_corpus, wav_to_fbank
from helpers import DEMO_CORPUS


def kaldi_fbank_numpy(waveform):
    """torchaudio.compliance.kaldi.fbank(wav * 2**15, num_mel_bins=40, window_type='hamming') in numpy."""
    samples = waveform.astype(np.float64) * 2**15
    num_frames = 1 + (len(samples) - 400) // 160
    frames = samples[np.arange(400)[None, :] + 160 * np.arange(num_frames)[:, None]]
    frames = frames - frames.mean(axis=1, keepdims=True)
    previous = np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
    frames = (frames - 0.97 * previous) * np.hamming(400)
    power = np.abs(np.fft.rfft(frames, n=512, axis=1)[:, :256]) ** 2
    mel_low, mel_high = 1127 * np.log(1 + 20 / 700), 1127 * np.log(1 + 8000 / 700)
    edges = mel_low + (mel_high - mel_low) / 41 * np.arange(42)
    left, center, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    fft_mel = 1127 * np.log(1 + 31.25 * np.arange(256) / 700)[None, :]
    weights = np.maximum(0, np.minimum((fft_mel - left) / (center - left), (right - fft_mel) / (right - center)))
    return np.log(np.maximum(power @ weights.T, np.finfo(np.float32).eps))


def speechlike(seconds, seed=0):
    """Noise with a moving resonance: a deterministic stand-in for audio."""
    rng = np.random.default_rng(seed)
    n = int(seconds * 16000)
    t = np.arange(n) / 16000
    tone = 0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t)
    return (tone + 0.05 * rng.standard_normal(n)).astype(np.float32)


def mel_center_hz(bin_index):
    """Centre frequency of Kaldi mel bin ``bin_index`` (40 bins, 20 Hz .. 8 kHz)."""
    mel_low, mel_high = 1127 * np.log(1 + 20 / 700), 1127 * np.log(1 + 8000 / 700)
    center = mel_low + (mel_high - mel_low) / 41 * (bin_index + 1)
    return 700 * (np.exp(center / 1127) - 1)


# --- compute_fbank -------------------------------------------------------------------


@pytest.mark.parametrize("num_samples", [399, 400, 559, 560, 16000, 16123])
def test_frame_count_follows_kaldi_snip_edges(num_samples):
    feats = compute_fbank(speechlike(1.1)[:num_samples], 16000)
    assert feats.shape == (num_fbank_frames(num_samples), 40)
    assert feats.dtype == np.float32
    assert num_fbank_frames(num_samples) == max(0, 1 + (num_samples - 400) // 160)


def test_matches_torchaudio_kaldi_fbank_formula():
    waveform = speechlike(1.0, seed=3)
    np.testing.assert_allclose(compute_fbank(waveform, 16000), kaldi_fbank_numpy(waveform), atol=2e-3)


@pytest.mark.parametrize("bin_index", [4, 15, 33])
def test_pure_tone_peaks_in_its_mel_bin(bin_index):
    t = np.arange(16000) / 16000
    tone = (0.5 * np.sin(2 * np.pi * mel_center_hz(bin_index) * t)).astype(np.float32)
    assert compute_fbank(tone, 16000).mean(axis=0).argmax() == bin_index


def test_float_audio_is_scaled_to_int16_range():
    waveform = speechlike(0.5)
    ours = compute_fbank(waveform, 16000)

    def knf_fbank(samples):
        extractor = knf.OnlineFbank(fbank_options())
        extractor.accept_waveform(16000, samples.astype(np.float32))
        extractor.input_finished()
        return np.stack([extractor.get_frame(i) for i in range(extractor.num_frames_ready)])

    np.testing.assert_allclose(ours, knf_fbank(waveform * 32768), rtol=1e-6, atol=1e-5)
    # Unscaled input would sit 2*ln(2**15) lower: power scales with the amplitude squared.
    np.testing.assert_allclose(ours - knf_fbank(waveform), 2 * np.log(2**15), atol=1e-3)
    as_int16 = np.round(waveform * 32768).astype(np.int16)
    np.testing.assert_allclose(compute_fbank(as_int16, 16000), compute_fbank(as_int16 / 32768.0, 16000), atol=1e-4)


def test_rejects_wrong_rate_and_shape():
    with pytest.raises(ValueError, match="8000 Hz"):
        compute_fbank(speechlike(0.5), 8000)
    with pytest.raises(ValueError, match="1-D"):
        compute_fbank(np.zeros((2, 8000), np.float32), 16000)


# --- load_audio ----------------------------------------------------------------------


def test_load_audio_returns_int16_values_exactly(tmp_path):
    samples = (np.random.default_rng(1).integers(-30000, 30000, 4000)).astype(np.int16)
    path = str(tmp_path / "a.flac")
    soundfile.write(path, samples, 16000, subtype="PCM_16")
    np.testing.assert_array_equal(load_audio(path) * 32768, samples.astype(np.float32))


def test_load_audio_refuses_8k_and_stereo_naming_the_file(tmp_path):
    narrow = str(tmp_path / "narrow.wav")
    soundfile.write(narrow, speechlike(0.5)[:4000], 8000)
    with pytest.raises(ValueError, match=r"narrow\.wav.*8000 Hz"):
        load_audio(narrow)
    assert load_audio(narrow, resample=True).shape == (8000,)

    stereo = str(tmp_path / "stereo.wav")
    left, right = speechlike(0.5, seed=1), speechlike(0.5, seed=2)
    soundfile.write(stereo, np.stack([left, right], axis=1), 16000, subtype="FLOAT")
    with pytest.raises(ValueError, match=r"stereo\.wav.*2 channels"):
        load_audio(stereo)
    np.testing.assert_allclose(load_audio(stereo, downmix=True), (left + right) / 2, atol=1e-6)


# --- tools/wav_to_fbank.py ------------------------------------------------------------


@pytest.fixture
def audio_dir(tmp_path):
    """Three 16 kHz FLAC files (one in a subdirectory) of different lengths."""
    root = tmp_path / "audio"
    (root / "spk").mkdir(parents=True)
    for name, seconds, seed in [("a", 0.7, 1), ("b", 1.3, 2), ("spk/c", 0.4, 3)]:
        soundfile.write(str(root / f"{name}.flac"), speechlike(seconds, seed), 16000, subtype="PCM_16")
    return str(root)


def load_split(out_dir, split="train"):
    """(manifest, list of feature arrays) of a written split."""
    manifest = read_manifest(os.path.join(out_dir, f"{split}.tsv"))
    return manifest, [np.load(manifest.full_path(i)) for i in range(len(manifest))]


def test_raw_features_stats_and_manifest(audio_dir, tmp_path):
    out = str(tmp_path / "raw")
    wav_to_fbank.main(["--audio-dir", audio_dir, "--out-dir", out, "--no-normalize"])
    manifest, feats = load_split(out)
    assert manifest.root == out
    assert [manifest.relative_path(i) for i in range(3)] == ["a.npy", "b.npy", "spk/c.npy"]
    for i, name in enumerate(["a", "b", "spk/c"]):
        expected = compute_fbank(load_audio(os.path.join(audio_dir, f"{name}.flac")), 16000)
        np.testing.assert_array_equal(feats[i], expected)
        assert manifest.num_frames[i] == len(expected)
    stacked = np.concatenate(feats).astype(np.float64)
    # Raw features' statistics carry the split's name: no mean-std.npy claims they are normalised.
    stats = load_mean_std(os.path.join(out, "train.mean-std.npy"))
    np.testing.assert_allclose(stats.mean, stacked.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(stats.std, stacked.std(axis=0), rtol=1e-4)
    assert sorted(os.listdir(out)) == ["a.npy", "b.npy", "spk", "train.features.json", "train.mean-std.npy", "train.tsv"]
    record = FeatureNormalization.read(os.path.join(out, "train.tsv"))
    assert record == FeatureNormalization(False, os.path.join(out, "train.mean-std.npy"), "melhubert-wav-to-fbank")


def test_normalisation_is_recorded_and_raw_splits_share_a_folder(audio_dir, tmp_path):
    out = str(tmp_path / "feats")
    wav_to_fbank.main(["--audio-dir", audio_dir, "--out-dir", out])
    wav_to_fbank.main(["--audio-dir", os.path.join(audio_dir, "spk"), "--out-dir", out, "--split", "valid",
                       "--mean-std", os.path.join(out, "mean-std.npy")])
    assert FeatureNormalization.read(os.path.join(out, "train.tsv")) == FeatureNormalization(
        True, os.path.join(out, "mean-std.npy"), "melhubert-wav-to-fbank")
    assert FeatureNormalization.read(os.path.join(out, "valid.tsv")).mean_std == os.path.join(out, "mean-std.npy")
    raw = str(tmp_path / "raw")
    for split, audio in (("train", audio_dir), ("valid", os.path.join(audio_dir, "spk"))):
        wav_to_fbank.main(["--audio-dir", audio, "--out-dir", raw, "--split", split, "--no-normalize"])
        assert not FeatureNormalization.read(os.path.join(raw, f"{split}.tsv")).normalized
    assert not os.path.exists(os.path.join(raw, "mean-std.npy"))


def test_default_normalises_by_corpus_stats(audio_dir, tmp_path):
    raw_out, norm_out = str(tmp_path / "raw"), str(tmp_path / "norm")
    wav_to_fbank.main(["--audio-dir", audio_dir, "--out-dir", raw_out, "--no-normalize"])
    wav_to_fbank.main(["--audio-dir", audio_dir, "--out-dir", norm_out, "--workers", "2"])
    _, raw = load_split(raw_out)
    _, normalised = load_split(norm_out)
    stats = load_mean_std(os.path.join(norm_out, "mean-std.npy"))
    for raw_feats, norm_feats in zip(raw, normalised):
        np.testing.assert_allclose(norm_feats, (raw_feats - stats.mean) / stats.std, atol=1e-5)
    stacked = np.concatenate(normalised).astype(np.float64)
    np.testing.assert_allclose(stacked.mean(axis=0), 0, atol=1e-4)
    np.testing.assert_allclose(stacked.std(axis=0), 1, atol=1e-4)


def test_given_mean_std_and_float16(audio_dir, tmp_path):
    train_out, dev_out = str(tmp_path / "train"), str(tmp_path / "dev")
    wav_to_fbank.main(["--audio-dir", audio_dir, "--out-dir", train_out, "--no-normalize"])
    stats_path = os.path.join(train_out, "train.mean-std.npy")
    wav_to_fbank.main(
        ["--audio-dir", audio_dir, "--out-dir", dev_out, "--split", "dev", "--mean-std", stats_path, "--dtype", "float16"]
    )
    assert not os.path.exists(os.path.join(dev_out, "mean-std.npy"))
    _, raw = load_split(train_out)
    _, dev = load_split(dev_out, "dev")
    stats = load_mean_std(stats_path)
    assert dev[0].dtype == np.float16
    np.testing.assert_allclose(dev[1], stats.normalize(raw[1]), atol=1e-2)


def test_refuses_to_overwrite(audio_dir, tmp_path):
    out = str(tmp_path / "feats")
    wav_to_fbank.main(["--audio-dir", audio_dir, "--out-dir", out])
    before = open(os.path.join(out, "train.tsv")).read()
    with pytest.raises(FileExistsError, match="train.tsv"):
        wav_to_fbank.main(["--audio-dir", audio_dir, "--out-dir", out])
    with pytest.raises(FileExistsError, match="feature files already exist"):
        wav_to_fbank.main(["--audio-dir", audio_dir, "--out-dir", out, "--split", "other", "--mean-std", os.path.join(out, "mean-std.npy")])
    assert open(os.path.join(out, "train.tsv")).read() == before
    wav_to_fbank.main(["--audio-dir", audio_dir, "--out-dir", out, "--overwrite"])
    assert open(os.path.join(out, "train.tsv")).read() == before


@pytest.mark.parametrize(
    "bad_name, write_bad, message",
    [
        ("narrow.wav", lambda p: soundfile.write(p, speechlike(0.5)[:4000], 8000), r"8000 Hz"),
        ("stereo.wav", lambda p: soundfile.write(p, np.stack([speechlike(0.5)] * 2, axis=1), 16000), r"2 channels"),
    ],
)
def test_bad_audio_fails_naming_the_file_and_leaves_nothing(audio_dir, tmp_path, bad_name, write_bad, message):
    write_bad(os.path.join(audio_dir, bad_name))
    out = str(tmp_path / "feats")
    utt_id = os.path.splitext(bad_name)[0]
    with pytest.raises(InputError, match=rf"utterance {utt_id}: .*{bad_name}.*{message}"):
        wav_to_fbank.main(["--audio-dir", audio_dir, "--out-dir", out])
    assert not os.path.exists(out)


def test_manifest_input_checks_sample_counts_and_lists_short_skips(audio_dir, tmp_path, capsys):
    soundfile.write(os.path.join(audio_dir, "tiny.flac"), speechlike(0.5)[:300], 16000, subtype="PCM_16")
    manifest = tmp_path / "set.tsv"
    manifest.write_text(f"{audio_dir}\na.flac\t{int(0.7 * 16000)}\ntiny.flac\t300\nspk/c.flac\t{int(0.4 * 16000)}\n")
    out = str(tmp_path / "feats")
    wav_to_fbank.main(["--manifest", str(manifest), "--out-dir", out])
    assert "skipped" in capsys.readouterr().err
    written, _ = load_split(out, "set")
    assert [written.relative_path(i) for i in range(len(written))] == ["a.npy", "spk/c.npy"]
    assert written.num_frames.tolist() == [num_fbank_frames(11200), num_fbank_frames(6400)]

    manifest.write_text(f"{audio_dir}\n../a.flac\t11200\n")
    with pytest.raises(ValueError, match=r"set\.tsv:2 \(a\): path '\.\./a\.flac' must stay below"):
        wav_to_fbank.main(["--manifest", str(manifest), "--out-dir", str(tmp_path / "other")])

    manifest.write_text(f"{audio_dir}\na.flac\t999\n")
    with pytest.raises(InputError, match=r"set\.tsv:2 \(a\): .*a\.flac: manifest says 999 samples"):
        wav_to_fbank.main(["--manifest", str(manifest), "--out-dir", str(tmp_path / "other")])


# --- the bundled demo corpus -----------------------------------------------------------


def test_demo_corpus_manifests_match_the_committed_audio():
    plan = make_demo_corpus.plan_corpus(12, 1234)
    assert len({utt.text for utt in plan}) == len(plan) >= 100
    listed = {}
    for split in ["train", "valid"]:
        for item in read_audio_manifest(os.path.join(DEMO_CORPUS, f"{split}.tsv")):
            listed[item.relative_path] = item
            info = soundfile.info(item.full_path)
            assert (info.samplerate, info.channels, info.frames) == (16000, 1, item.expected_samples)
    assert sorted(listed) == sorted(utt.relative_path for utt in plan)


def test_demo_corpus_to_features(tmp_path):
    rows = open(os.path.join(DEMO_CORPUS, "train.tsv")).read().splitlines()[1:4]
    manifest = tmp_path / "demo.tsv"
    manifest.write_text(f"{DEMO_CORPUS}\n" + "\n".join(rows) + "\n")
    out = str(tmp_path / "feats")
    wav_to_fbank.main(["--manifest", str(manifest), "--out-dir", out])
    written, feats = load_split(out, "demo")
    for row, count, array in zip(rows, written.num_frames, feats):
        assert count == len(array) == num_fbank_frames(int(row.split("\t")[1]))
        assert np.isfinite(array).all()


KILL_AT_EVERY_RENAME = r'''
import hashlib, json, os, shutil, sys
from melhubert_fairseq.tools import wav_to_fbank

audio, out, old_copy = sys.argv[1:4]

def snapshot():
    found = {}
    for dirpath, dirnames, filenames in os.walk(out):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith("."):
                path = os.path.join(dirpath, name)
                found[os.path.relpath(path, out)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return found

def hidden():
    return sorted(os.path.join(d, n) for d, dirs, files in os.walk(out) for n in dirs + files if n.startswith("."))

normalised = ["--audio-dir", audio, "--out-dir", out]
wav_to_fbank.main(normalised)
new = snapshot()
shutil.rmtree(out)
wav_to_fbank.main(normalised + ["--dtype", "float16"])  # the old outputs: float16 features
old = snapshot()
shutil.copytree(out, old_copy)
results, step = [], 0
while True:
    shutil.rmtree(out)
    shutil.copytree(old_copy, out)
    pid = os.fork()
    if pid == 0:  # the run, killed (os._exit: no cleanup runs) at its step-th rename
        done = [0]
        def dying(real):
            def rename(*args, **kwargs):
                if done[0] == step:
                    os._exit(9)
                done[0] += 1
                return real(*args, **kwargs)
            return rename
        os.rename, os.replace = dying(os.rename), dying(os.replace)
        sys.stderr = open(os.devnull, "w")
        wav_to_fbank.main(normalised + ["--overwrite"])
        os._exit(0)
    killed = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 9
    state = snapshot()
    if "train.tsv" in state:
        after_kill = "old" if state == old else "new" if state == new else "manifest over mixed features"
    else:
        # (mean-std.npy and train.features.json are the same in both: only the dtype differs)
        whose = {"old" if old.get(p) == d else "new" if new.get(p) == d else "half"
                 for p, d in state.items() if old.get(p) != new.get(p)}
        after_kill = "no manifest" if whose <= {"old"} or whose <= {"new"} else "mixed: " + ",".join(sorted(whose))
    wav_to_fbank.main(normalised + ["--overwrite"])  # rerun the same command
    results.append({"step": step, "killed": killed, "after_kill": after_kill,
                    "rerun_equal": snapshot() == new, "hidden": hidden()})
    if not killed:
        break
    step += 1
print(json.dumps(results))
'''


def test_overwrite_killed_at_every_rename_never_leaves_a_manifest_over_mixed_features(audio_dir, tmp_path):
    """The issue's case: wav-to-fbank --overwrite killed while moving features into place used to
    leave the old train.tsv over a mix of raw and normalised features."""
    import json
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", KILL_AT_EVERY_RENAME, audio_dir, str(tmp_path / "feats"), str(tmp_path / "old")],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    trials = json.loads(result.stdout.strip().splitlines()[-1])
    for trial in trials:
        assert trial["after_kill"] in ("old", "new", "no manifest"), trial
        assert trial["rerun_equal"] and trial["hidden"] == [], trial
    assert len(trials) >= 8 and not trials[-1]["killed"]  # every rename of the publish was a kill point
    assert {trial["after_kill"] for trial in trials} >= {"old", "no manifest"}


def test_staging_folder_of_a_killed_run_is_removed_by_the_next_run(audio_dir, tmp_path, capsys):
    out = tmp_path / "feats"
    staging = out / ".train.wav_to_fbank.staging" / "new"
    staging.mkdir(parents=True)
    (staging / "a.npy").write_bytes(b"half-written by a killed run")
    (out / ".train.wav_to_fbank.lock").write_text("")  # its lock file; the kill released the lock itself
    wav_to_fbank.main(["--audio-dir", audio_dir, "--out-dir", str(out)])
    assert "note: removed the staging folder" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["a.npy", "b.npy", "mean-std.npy", "spk", "train.features.json", "train.tsv"]
