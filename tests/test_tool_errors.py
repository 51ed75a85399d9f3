"""Every console script that reads user files, fed one bad file: exit 2, one ``error:`` line and nothing else on
screen (no warning, no leftover progress bar), nothing written.

The tools run as real subprocesses (the installed console scripts), from a
temporary working folder, all at once (the checkpoint tools import torch and fairseq).
More bad audio (8 kHz, stereo, corrupt FLAC, a FIFO) goes through the same
console entry point in-process, in ``test_bad_audio_through_the_console_entry_point``.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import os
import pickle
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import pytest
import soundfile

from melhubert_fairseq.kmeans import KMeansModel, save_kmeans

BIN = Path(sys.executable).parent


def console_script(name: str) -> List[str]:
    """``melhubert-<name>`` next to this Python, or ``python -m`` when it is not installed."""
    script = BIN / f"melhubert-{name}"
    return [str(script)] if script.exists() else [sys.executable, "-m", f"melhubert_fairseq.tools.{name.replace('-', '_')}"]


def digest_tree(root: Path) -> Dict[str, str]:
    """sha256 of every file below ``root`` (FIFOs by name only: reading one would block)."""
    digests = {}
    for path in sorted(root.rglob("*")):
        if path.is_fifo():
            digests[str(path)] = "fifo"
        elif path.is_file():
            digests[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def write_wav(path: Path, samples: int = 8000, rate: int = 16000, channels: int = 1) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    wave = np.random.default_rng(0).uniform(-0.3, 0.3, (samples, channels)).astype(np.float32)
    soundfile.write(path, wave, rate, subtype="PCM_16")


def write_float_wav(path: Path, bad_value: float) -> None:
    """A 32-bit float WAV of 8000 samples whose sample 100 is ``bad_value`` (NaN or Inf)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    wave = np.random.default_rng(0).uniform(-0.3, 0.3, 8000).astype(np.float32)
    wave[100] = bad_value
    soundfile.write(path, wave, 16000, subtype="FLOAT")


def feature_manifest(case: Path, array: np.ndarray, frames: int = 10) -> str:
    """``in/train.tsv`` with one row pointing at ``in/feats/u1.npy`` holding ``array``."""
    (case / "in" / "feats").mkdir(parents=True)
    np.save(case / "in" / "feats" / "u1.npy", array, allow_pickle=True)
    (case / "in" / "train.tsv").write_text(f"{case / 'in' / 'feats'}\nu1.npy\t{frames}\n")
    return "in/train.tsv"


@dataclass
class BadInput:
    """One tool, one bad input file under ``in/``; outputs would go to ``out``."""

    tool: str
    make: Callable[[Path, Path], List[str]]  # (case folder, tiny checkpoint) -> arguments
    message: str  # must appear in the error line


def _truncated_wav(case, ckpt):
    write_wav(case / "in" / "audio" / "good.wav")
    write_wav(case / "in" / "audio" / "cut.wav", samples=16000)
    cut = case / "in" / "audio" / "cut.wav"
    cut.write_bytes(cut.read_bytes()[:12000])
    return ["--audio-dir", "in/audio", "--out-dir", "out"]


def _kaldi_tiny_std(case, ckpt):
    (case / "in").mkdir()
    (case / "in" / "train.scp").write_text(f"u1 {case / 'in' / 'raw.ark'}:3\n")
    np.save(case / "in" / "ms.npy", np.stack([np.zeros(40), np.full(40, 1e-40)]).astype(np.float32))
    return ["--scp", "in/train.scp", "--mean-var", "in/ms.npy", "--out-dir", "out"]


def _kaldi_labels_bad_scp(case, ckpt):
    manifest = feature_manifest(case, np.zeros((10, 40), np.float32))
    (case / "in" / "labels.scp").write_text("u1\n")
    return ["--manifest", manifest, "--label-scp", "in/labels.scp", "--out-dir", "out"]


def _create_manifest_int16(case, ckpt):
    (case / "in" / "feats").mkdir(parents=True)
    np.save(case / "in" / "feats" / "u1.npy", np.zeros((10, 40), np.int16))
    return ["--feature-dir", "in/feats", "--out-dir", "out"]


def _learn_kmeans_pickle(case, ckpt):
    manifest = feature_manifest(case, np.array([{"frames": 10}], dtype=object))
    return ["--manifest", manifest, "--km-path", "out/km.npy", "--num-clusters", "2", "--no-progress"]


def _dump_km_complex(case, ckpt):
    manifest = feature_manifest(case, np.zeros((10, 40), np.complex64))
    centroids = np.random.default_rng(0).standard_normal((4, 40)).astype(np.float32)
    save_kmeans(str(case / "in" / "km.npy"), KMeansModel(centroids, {"feature_source": {"kind": "fbank"}}))
    return ["--manifest", manifest, "--km-path", "in/km.npy", "--out-dir", "out", "--no-progress"]


def _import_kmeans_not_kmeans(case, ckpt):
    import joblib

    (case / "in").mkdir()
    joblib.dump({"cluster_centers_": np.zeros((4, 40))}, case / "in" / "km.bin")
    return ["--joblib", "in/km.bin", "--km-path", "out/km.npy", "--trust-pickle"]


def _merge_short_shard(case, ckpt):
    (case / "in").mkdir()
    (case / "in" / "train.tsv").write_text("/feats\nu1.npy\t3\nu2.npy\t2\n")
    (case / "in" / "train_0_2.km").write_text("1 2 3\n")
    (case / "in" / "train_1_2.km").write_text("1\n")
    return ["--manifest", "in/train.tsv", "--label-dir", "in", "--nshard", "2", "--out", "out/train.km"]


def _extract_rows(kind):
    """extract-features on a manifest whose row would write onto an input (the issue's three ways)."""

    def make(case, ckpt):
        feats = case / "in" / "feats"
        feats.mkdir(parents=True)
        for index in range(2):
            np.save(feats / f"u{index}.npy", np.random.default_rng(index).standard_normal((20, 40)).astype(np.float32))
        # --out-dir is the case folder: 'out' is never written; layer1/ would be.
        row = {"dotdot": "../in/feats/u1.npy", "absolute": str(feats / "u1.npy"), "inside": "u1.npy"}[kind]
        root = case / "layer1"  # rows are relative to it; with '..' the output path is the input's
        if kind == "inside":
            root = case / "in" / "layer1"
            root.mkdir()
            os.rename(feats / "u1.npy", root / "u1.npy")
        (case / "in" / "rows.tsv").write_text(f"{root}\n{row}\t20\n")
        out_dir = "." if kind != "inside" else "in"
        return ["--checkpoint", str(ckpt), "--manifest", "in/rows.tsv", "--out-dir", out_dir, "--layers", "1",
                "--no-progress"] + (["--overwrite"] if kind == "absolute" else [])

    return make


def _garbage_checkpoint(case, ckpt):
    (case / "in").mkdir()
    (case / "in" / "model.ckpt").write_bytes(os.urandom(2000))
    return ["in/model.ckpt", "out/model.pt"]


def _average_garbage(case, ckpt):
    (case / "in").mkdir()
    for name in ("a.pt", "b.pt"):
        (case / "in" / name).write_bytes(os.urandom(2000))
    return ["--inputs", "in/a.pt", "in/b.pt", "--output", "out/avg.pt"]


def _audio_manifest(case: Path) -> str:
    """``in/train.tsv``: fairseq's audio manifest layout (relative root, one .wav row)."""
    write_wav(case / "in" / "audio" / "u1.wav")
    (case / "in" / "train.tsv").write_text("audio\nu1.wav\t8000\n")
    return "in/train.tsv"


def _write_kmeans(path: Path) -> None:
    centroids = np.random.default_rng(0).standard_normal((4, 40)).astype(np.float32)
    save_kmeans(str(path), KMeansModel(centroids, {"feature_source": {"kind": "fbank"}}))


def _learn_kmeans_audio_manifest(case, ckpt):
    return ["--manifest", _audio_manifest(case), "--km-path", "out/km.npy", "--num-clusters", "2", "--no-progress"]


def _dump_km_audio_manifest(case, ckpt):
    manifest = _audio_manifest(case)
    _write_kmeans(case / "in" / "km.npy")
    return ["--manifest", manifest, "--km-path", "in/km.npy", "--out-dir", "out", "--no-progress"]


def _extract_audio_manifest(case, ckpt):
    return ["--checkpoint", str(ckpt), "--manifest", _audio_manifest(case), "--out-dir", "out", "--no-progress"]


def _wav_to_fbank_feature_manifest(case, ckpt):
    return ["--manifest", feature_manifest(case, np.zeros((10, 40), np.float32)), "--out-dir", "out"]


def _extract_kmeans_checkpoint(case, ckpt):
    manifest = feature_manifest(case, np.zeros((10, 40), np.float32))
    _write_kmeans(case / "in" / "km.npy")
    return ["--checkpoint", "in/km.npy", "--manifest", manifest, "--out-dir", "out", "--no-progress"]


def _export_pickle(case, ckpt):
    # What fairseq's simple_kmeans writes with joblib: a plain pickle, which torch.load would refuse
    # with advice to unpickle it unsafely.
    (case / "in").mkdir()
    (case / "in" / "km.pt").write_bytes(pickle.dumps({"cluster_centers_": np.zeros((4, 40))}, protocol=4))
    return ["in/km.pt", "out/model.ckpt"]


def _average_npy(case, ckpt):
    (case / "in").mkdir()
    for name in ("a.npy", "b.npy"):
        np.save(case / "in" / name, np.zeros((3, 40), np.float32))
    return ["--inputs", "in/a.npy", "in/b.npy", "--output", "out/avg.pt"]


def _convert_text(case, ckpt):
    (case / "in").mkdir()
    (case / "in" / "model.ckpt").write_text("https://example.org/melhubert.ckpt\n")
    return ["in/model.ckpt", "out/model.pt"]


def _average_last_and_best_only(case, ckpt):
    (case / "in" / "run").mkdir(parents=True)
    for name in ("checkpoint_last.pt", "checkpoint_best.pt"):
        shutil.copy(ckpt, case / "in" / "run" / name)
    return ["--inputs", "in/run", "--num-update-checkpoints", "2", "--output", "out/avg.pt"]


def _demo_corpus_exists(case, ckpt):
    (case / "in" / "corpus").mkdir(parents=True)
    (case / "in" / "corpus" / "train.tsv").write_text("kept\n")
    return ["--out-dir", str(case / "in" / "corpus")]


def _kmeans_rows(tool: str, kind: str):
    """learn-kmeans / dump-km-labels on a manifest whose second row is absolute or leaves its root."""

    def make(case, ckpt):
        manifest = feature_manifest(case, np.random.default_rng(0).standard_normal((10, 40)).astype(np.float32))
        feats = case / "in" / "feats"
        row = {"dotdot": "../feats/u1.npy", "absolute": str(feats / "u1.npy")}[kind]
        (case / "in" / "train.tsv").write_text(f"{feats}\nu1.npy\t10\n{row}\t10\n")
        if tool == "learn-kmeans":
            return ["--manifest", manifest, "--km-path", "out/km.npy", "--num-clusters", "2", "--no-progress"]
        _write_kmeans(case / "in" / "km.npy")
        return ["--manifest", manifest, "--km-path", "in/km.npy", "--out-dir", "out", "--no-progress"]

    return make


def _extract_nan_audio(case, ckpt):
    write_wav(case / "in" / "audio" / "good.wav")
    write_float_wav(case / "in" / "audio" / "nan.wav", np.nan)
    return ["--checkpoint", str(ckpt), "--audio-dir", "in/audio", "--out-dir", "out", "--no-progress"]


def _learn_kmeans_onto_features(link: bool):
    """learn-kmeans --overwrite whose --km-path is an input feature file (or a symlink to one)."""

    def make(case, ckpt):
        manifest = feature_manifest(case, np.random.default_rng(0).standard_normal((10, 40)).astype(np.float32))
        km_path = "in/feats/u1.npy"
        if link:
            os.symlink("feats/u1.npy", case / "in" / "km.npy")
            km_path = "in/km.npy"
        return ["--manifest", manifest, "--km-path", km_path, "--num-clusters", "2", "--no-progress", "--overwrite"]

    return make


def _wav_to_fbank_onto_its_manifest(case, ckpt):
    return ["--manifest", _audio_manifest(case), "--out-dir", "in", "--overwrite"]


def _average_onto_an_input(case, ckpt):
    (case / "in").mkdir()
    for name in ("a.pt", "b.pt"):
        shutil.copy(ckpt, case / "in" / name)
    return ["--inputs", "in/a.pt", "in/b.pt", "--output", "in/a.pt", "--overwrite"]


def _export_onto_its_input(case, ckpt):
    (case / "in").mkdir()
    shutil.copy(ckpt, case / "in" / "a.pt")
    return ["in/a.pt", "in/a.pt", "--overwrite"]


BAD_INPUTS = {
    "make-demo-corpus existing corpus": BadInput("make-demo-corpus", _demo_corpus_exists, "corpus already exists; refusing"),
    "wav-to-fbank truncated wav": BadInput("wav-to-fbank", _truncated_wav, "cut.wav: truncated audio file"),
    "import-kaldi-features std 1e-40": BadInput("import-kaldi-features", _kaldi_tiny_std, "std must be positive"),
    "import-kaldi-labels bad scp line": BadInput("import-kaldi-labels", _kaldi_labels_bad_scp, "labels.scp:1: expected"),
    "create-manifest int16": BadInput("create-manifest", _create_manifest_int16, "dtype int16"),
    "learn-kmeans pickled npy": BadInput("learn-kmeans", _learn_kmeans_pickle, "train.tsv:2 (u1): "),
    "dump-km-labels complex": BadInput("dump-km-labels", _dump_km_complex, "train.tsv:2 (u1): "),
    "import-kmeans pickled dict": BadInput("import-kmeans", _import_kmeans_not_kmeans, "km.bin: holds a builtins.dict"),
    "merge-km-shards short shard": BadInput("merge-km-shards", _merge_short_shard, "train_1_2.km:1: 1 labels but 2"),
    # An input .npy must never be replaced by hidden states (it was, through these rows).
    "extract-features '..' row": BadInput("extract-features", _extract_rows("dotdot"), "rows.tsv:2 (u1): path '../in"),
    "extract-features absolute row, --overwrite": BadInput(
        "extract-features", _extract_rows("absolute"), "rows.tsv:2 (u1): path '/"
    ),
    "extract-features input inside the output": BadInput(
        "extract-features", _extract_rows("inside"), "rows.tsv:2 (u1): the input"
    ),
    # Rows that are absolute or leave their root are refused by every tool reading a manifest.
    **{
        f"{tool} {kind} row": BadInput(tool, _kmeans_rows(tool, kind), "in/train.tsv:3 (u1): path ")
        for tool in ("learn-kmeans", "dump-km-labels") for kind in ("dotdot", "absolute")
    },
    "extract-features NaN audio": BadInput(
        "extract-features", _extract_nan_audio, "utterance nan: in/audio/nan.wav: 1 of 8000 samples are NaN or infinite"
    ),
    # An output that is an input is refused with --overwrite too (after resolving links).
    "learn-kmeans --km-path an input feature file": BadInput(
        "learn-kmeans", _learn_kmeans_onto_features(link=False), "in/feats/u1.npy: this output is an input of the run"
    ),
    "learn-kmeans --km-path a link to an input": BadInput(
        "learn-kmeans", _learn_kmeans_onto_features(link=True), "in/km.npy: this output is an input of the run ("
    ),
    "wav-to-fbank --out-dir holding its manifest": BadInput(
        "wav-to-fbank", _wav_to_fbank_onto_its_manifest, "in/train.tsv: this output is an input of the run"
    ),
    "average-checkpoints --output an input": BadInput(
        "average-checkpoints", _average_onto_an_input, "in/a.pt: this output is an input of the run"
    ),
    "export-original onto its input": BadInput(
        "export-original", _export_onto_its_input, "in/a.pt: this output is an input of the run"
    ),
    "convert-original garbage": BadInput("convert-original", _garbage_checkpoint, "model.ckpt"),
    "average-checkpoints garbage": BadInput("average-checkpoints", _average_garbage, "a.pt"),
    # The wrong kind of manifest, either way: say which tool to run (data/manifest.py recognises it).
    "learn-kmeans audio manifest": BadInput("learn-kmeans", _learn_kmeans_audio_manifest, "train.tsv:2 (u1): this is an "
                                            "audio manifest (u1.wav is audio and 8000 its num_samples): run melhubert-wav-to-fbank first"),
    "dump-km-labels audio manifest": BadInput("dump-km-labels", _dump_km_audio_manifest, "train.tsv:2 (u1): this is an "
                                              "audio manifest (u1.wav is audio and 8000 its num_samples): run melhubert-wav-to-fbank first"),
    "extract-features audio manifest as --manifest": BadInput(
        "extract-features", _extract_audio_manifest, "this is an audio manifest (u1.wav is audio and 8000 its "
        "num_samples): pass it as --audio-manifest (the model computes the fbank itself) or run melhubert-wav-to-fbank first"
    ),
    "wav-to-fbank feature manifest": BadInput("wav-to-fbank", _wav_to_fbank_feature_manifest, "train.tsv:2 (u1): this is a "
                                              "feature manifest (u1.npy is a fbank .npy file and 10 its num_frames): it is "
                                              "what melhubert-wav-to-fbank writes"),
    # Files that are not checkpoints, named for what they are (file_sniffing.check_torch_file).
    "extract-features k-means model as --checkpoint": BadInput(
        "extract-features", _extract_kmeans_checkpoint,
        "in/km.npy: not a torch checkpoint: it is a k-means model (centroids (4, 40), written by melhubert-learn-kmeans)",
    ),
    "export-original plain pickle": BadInput("export-original", _export_pickle,
                                             "in/km.pt: not a torch checkpoint: it is a Python pickle"),
    "average-checkpoints .npy": BadInput("average-checkpoints", _average_npy,
                                         "in/a.npy: not a torch checkpoint: it is a NumPy .npy array of shape (3, 40)"),
    "convert-original text file": BadInput("convert-original", _convert_text, "in/model.ckpt: not a torch checkpoint: "
                                           "it is a text file (it starts with 'https://example.org/melhubert.ckpt')"),
    "average-checkpoints only last and best": BadInput(
        "average-checkpoints", _average_last_and_best_only,
        "in/run: asked for the newest 2 update checkpoints, it has 0; its .pt files: checkpoint_best.pt, "
        "checkpoint_last.pt. --num-update-checkpoints averages checkpoint_<epoch>_<update>.pt",
    ),
}


def terminal_lines(stderr: str) -> List[str]:
    """The non-blank lines a terminal shows for ``stderr`` (text after a carriage return overwrites the line)."""
    lines = (line.rsplit("\r", 1)[-1] for line in stderr.split("\n"))
    return [line for line in lines if line.strip()]


@pytest.fixture(scope="module")
def tool_runs(tmp_path_factory, tiny_checkpoint):
    """Run every BAD_INPUTS case at once; -> {case: (result, input digests before, after, case folder)}."""
    root = tmp_path_factory.mktemp("bad_inputs")
    prepared = {}
    for index, (name, bad) in enumerate(BAD_INPUTS.items()):
        case = root / f"case{index}"
        case.mkdir()
        args = bad.make(case, tiny_checkpoint)
        prepared[name] = (case, console_script(bad.tool) + args, digest_tree(case / "in"))

    def run(name):
        case, command, _ = prepared[name]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        result = subprocess.run(command, cwd=case, capture_output=True, timeout=300, env=env)
        # Decoded by hand: text=True would turn the carriage returns of progress bars into newlines.
        result.stdout, result.stderr = result.stdout.decode(), result.stderr.decode()
        return result

    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(zip(prepared, pool.map(run, prepared)))
    return {name: (results[name], before, digest_tree(case / "in"), case) for name, (case, _, before) in prepared.items()}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_one_error_line_exit_2_and_writes_nothing(tool_runs, case):
    result, inputs_before, inputs_after, folder = tool_runs[case]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(errors) == 1, result.stderr[-3000:]
    assert BAD_INPUTS[case].message in errors[0], errors[0]
    assert "Traceback" not in result.stderr
    # Nothing else on screen: no warning, no half-drawn progress bar, no advice to load with weights_only=False.
    assert terminal_lines(result.stderr) == errors, result.stderr[-3000:]
    assert "weights_only" not in result.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["in"]  # no output (nor an empty output folder)
    assert inputs_after == inputs_before  # byte-identical inputs




@pytest.mark.parametrize(
    "write, message",
    [
        (lambda path: write_wav(path, rate=8000), "x.wav: sample rate is 8000 Hz"),
        (lambda path: write_wav(path, channels=2), "x.wav: has 2 channels"),
        (lambda path: corrupt_flac(path), "x.wav: cannot read audio"),
        (lambda path: os.mkfifo(path), "x.wav is a FIFO"),
        (lambda path: write_float_wav(path, np.nan), "x.wav: 1 of 8000 samples are NaN or infinite"),
        (lambda path: write_float_wav(path, np.inf), "x.wav: 1 of 8000 samples are NaN or infinite"),
        (lambda path: soundfile.write(path, np.zeros(0, np.float32), 16000), "x.wav: has no audio samples"),
    ],
    ids=["8kHz", "stereo", "corrupt-flac", "fifo", "nan", "inf", "empty"],
)
def test_bad_audio_through_the_console_entry_point(tmp_path, capsys, monkeypatch, hang_guard, write, message):
    from melhubert_fairseq.tools import wav_to_fbank

    (tmp_path / "audio").mkdir()
    write(tmp_path / "audio" / "x.wav")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["melhubert-wav-to-fbank", "--audio-dir", "audio", "--out-dir", "out"])
    assert wav_to_fbank.main() == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and errors[0].startswith("error: utterance x: "), errors
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audio"]


def corrupt_flac(path: Path) -> None:
    """A FLAC file (named ``path``) whose second half is zeroed."""
    soundfile.write(path, np.random.default_rng(0).uniform(-0.3, 0.3, 16000), 16000, format="FLAC", subtype="PCM_16")
    data = bytearray(path.read_bytes())
    data[len(data) // 2 :] = bytes(len(data) - len(data) // 2)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "array, message",
    [
        (np.array([{"frames": 10}], dtype=object), "not a plain .npy array: it holds pickled Python objects"),
        (np.zeros(40, np.float32), "has shape (40,), expected (frames, 40)"),
        (np.zeros((2, 10, 40), np.float32), "has shape (2, 10, 40), expected (frames, 40)"),
        (np.zeros((0, 40), np.float32), "has no frames"),
        (np.zeros((10, 40), np.int16), "has dtype int16, expected float32 or float16"),
        (np.zeros((10, 40), np.complex64), "has dtype complex64"),
    ],
    ids=["pickled", "1-D", "3-D", "0-frames", "int16", "complex"],
)
def test_extract_features_bad_npy_through_the_console_entry_point(
    tiny_checkpoint, tmp_path, capsys, monkeypatch, array, message
):
    from melhubert_fairseq.tools import extract_features

    manifest = feature_manifest(tmp_path, array)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["melhubert-extract-features", "--checkpoint", str(tiny_checkpoint),
                                      "--manifest", manifest, "--out-dir", "out", "--no-progress"])
    assert extract_features.main() == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: in/train.tsv:2 (u1): ") and message in errors[0], errors
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]
