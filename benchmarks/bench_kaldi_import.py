"""Kaldi compressed-feature import: our kaldiio path versus a per-element pure-Python decoder.

The original release converted its Kaldi dump with a hand-written reader that
decodes every byte of a compressed (``CM``) matrix with Python arithmetic in
nested loops. This script writes one synthetic LibriSpeech-like dump of ``CM``
arks (scp paths pointing at a machine that does not exist), then in the same
run converts it to normalised ``.npy`` files:

* baseline: scp parsed by hand, each matrix decoded by :func:`decode_cm_pure_python`
  (written here, from the Kaldi format description), normalised, ``np.save``;
* kaldiio per utterance: ``kaldiio.load_mat("ark:offset")`` opening the ark for
  every utterance (shows what grouping reads by ark buys);
* ours: ``melhubert-import-kaldi-features`` (kaldiio decoding, reads grouped by
  ark in offset order, staging folder, manifest), with 1 and N workers;
* decoding alone, arks held in memory: the baseline decoder versus kaldiio.

It checks that every path produced the same features, then prints
utterances/s, frames/s and the speed-up over the baseline.

    python benchmarks/bench_kaldi_import.py --utterances 100
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import struct
import tempfile
import time

import kaldiio
import numpy as np
from kaldiio.compression_header import kSpeechFeature
from kaldiio.matio import read_kaldi

from melhubert_fairseq.data.features import FBANK_NUM_MEL_BINS, MeanStdAccumulator
from melhubert_fairseq.tools import import_kaldi_features

WRITTEN_DIR = "/export/original-machine/fbank"


def make_dump(folder: str, num_utts: int, num_arks: int, seed: int) -> tuple:
    """Write CM-compressed arks, a scp with foreign paths and a .mean-var; return (scp, mean-var, frames)."""
    rng = np.random.default_rng(seed)
    acc = MeanStdAccumulator(FBANK_NUM_MEL_BINS)
    scp_lines = []
    total_frames = 0
    per_ark = -(-num_utts // num_arks)
    for ark_index in range(num_arks):
        ark_name = f"raw_fbank_train.{ark_index + 1}.ark"
        local_scp = os.path.join(folder, "local.scp")
        with kaldiio.WriteHelper(
            f"ark,scp:{os.path.join(folder, ark_name)},{local_scp}", compression_method=kSpeechFeature
        ) as writer:
            for i in range(ark_index * per_ark, min(num_utts, (ark_index + 1) * per_ark)):
                # LibriSpeech utterances average ~12 s (1230 frames of 10 ms).
                frames = int(np.clip(rng.normal(1230, 350), 200, 2400))
                feats = (rng.normal(size=(frames, FBANK_NUM_MEL_BINS)) * 2.5 + np.linspace(4, 14, FBANK_NUM_MEL_BINS)).astype(np.float32)
                writer(f"{1000 + i}-{ark_index}-{i:04d}", feats)
                acc.update(feats)
                total_frames += frames
        with open(local_scp) as handle:
            for line in handle:
                utt, spec = line.split()
                scp_lines.append(f"{utt} {WRITTEN_DIR}/{ark_name}:{spec.rsplit(':', 1)[1]}\n")
        os.unlink(local_scp)
    scp = os.path.join(folder, "train.scp")
    with open(scp, "w") as handle:
        handle.writelines(scp_lines)
    mean_var = os.path.join(folder, "train.mean-var")
    with open(mean_var, "w") as handle:
        handle.write("[" + ",".join(repr(float(x)) for x in acc.sum) + "]\n")
        handle.write("[" + ",".join(repr(float(x)) for x in acc.sum_sq) + "]\n")
        handle.write(f"{acc.count}\n")
    return scp, mean_var, total_frames


# ---------------------------------------------------------------- baseline ---


def read_mean_var_baseline(path: str) -> tuple:
    """mean, std from a .mean-var, the way the original script did it."""
    with open(path) as handle:
        total = np.array([float(x) for x in handle.readline().strip()[1:-1].split(",")])
        total_sq = np.array([float(x) for x in handle.readline().strip()[1:-1].split(",")])
        count = int(handle.readline().strip())
    mean = total / count
    return mean, np.sqrt(total_sq / count - mean**2)


def uint16_to_float(min_value: float, value_range: float, value: int) -> float:
    """Kaldi CompressedMatrix: a 16-bit quantised value of the global range."""
    return min_value + value_range * value / 65535.0


def byte_to_float(p0: float, p25: float, p75: float, p100: float, value: int) -> float:
    """Kaldi CompressedMatrix: a byte, piecewise linear between a column's percentiles."""
    if value <= 64:
        return p0 + (p25 - p0) * value / 64.0
    if value <= 192:
        return p25 + (p75 - p25) * (value - 64) / 128.0
    return p75 + (p100 - p75) * (value - 192) / 63.0


def decode_cm_pure_python(handle) -> np.ndarray:
    """Decode one Kaldi ``CM`` matrix element by element in Python (the baseline)."""
    if handle.read(2) != b"\0B":
        raise ValueError("not a binary Kaldi object")
    token = b""
    while not token.endswith(b" "):
        token += handle.read(1)
    if token != b"CM ":
        raise ValueError(f"baseline decodes CM only, got {token!r}")
    min_value, value_range, rows, cols = struct.unpack("<ffii", handle.read(16))
    percentiles = []
    for _ in range(cols):
        quantised = struct.unpack("<HHHH", handle.read(8))
        percentiles.append([uint16_to_float(min_value, value_range, q) for q in quantised])
    columns = []
    for col in range(cols):  # CM stores the matrix column by column
        p0, p25, p75, p100 = percentiles[col]
        data = handle.read(rows)
        columns.append([byte_to_float(p0, p25, p75, p100, byte) for byte in data])
    return np.array(columns, dtype=np.float32).T


def read_cm_pure_python(ark_path: str, offset: int) -> np.ndarray:
    """Open the ark, seek and decode with the pure-Python baseline decoder."""
    with open(ark_path, "rb") as ark:
        ark.seek(offset)
        return decode_cm_pure_python(ark)


def read_kaldiio_reopening(ark_path: str, offset: int) -> np.ndarray:
    """kaldiio decoding, opening the ark again for this one utterance (no grouping by ark)."""
    return kaldiio.load_mat(f"{ark_path}:{offset}")


def convert_scp(scp: str, mean_var: str, out_dir: str, read_matrix) -> int:
    """Original-style conversion loop: scp by hand, ``read_matrix``, normalise, np.save; return frames."""
    mean, std = read_mean_var_baseline(mean_var)
    dump_dir = os.path.dirname(scp)
    frames = 0
    with open(scp) as handle:
        for line in handle:
            utt, spec = line.split()
            path, offset = spec.rsplit(":", 1)
            feats = read_matrix(os.path.join(dump_dir, os.path.basename(path)), int(offset))
            np.save(os.path.join(out_dir, f"{utt}.npy"), ((feats - mean) / std).astype(np.float32))
            frames += len(feats)
    return frames


# ------------------------------------------------------------------- run ---


def timed(label: str, func, *args) -> float:
    """Run ``func`` once and return its wall time."""
    start = time.perf_counter()
    func(*args)
    seconds = time.perf_counter() - start
    print(f"  ran {label} in {seconds:.2f} s", flush=True)
    return seconds


def decode_all_in_memory(scp: str, decode) -> int:
    """Decode every matrix of the scp from arks held in memory (no file I/O); return frames."""
    dump_dir = os.path.dirname(scp)
    arks = {}
    frames = 0
    with open(scp) as handle:
        for line in handle:
            spec = line.split()[1]
            path, offset = spec.rsplit(":", 1)
            name = os.path.basename(path)
            if name not in arks:
                with open(os.path.join(dump_dir, name), "rb") as ark:
                    arks[name] = io.BytesIO(ark.read())
            arks[name].seek(int(offset))
            frames += len(decode(arks[name]))
    return frames


def max_difference(dir_a: str, dir_b: str) -> float:
    """Largest absolute difference between same-named .npy files of two folders."""
    names = sorted(os.listdir(dir_a))
    assert names == sorted(os.listdir(dir_b)), "the two paths wrote different utterances"
    return max(float(np.abs(np.load(os.path.join(dir_a, n)) - np.load(os.path.join(dir_b, n))).max()) for n in names)


def main() -> None:
    """Build the corpus, time every path on it, check agreement and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--utterances", type=int, default=100, help="synthetic utterances (~1230 frames each)")
    parser.add_argument("--arks", type=int, default=2, help="ark files the corpus is split into")
    parser.add_argument("--workers", type=int, default=2, help="worker processes for the parallel run of our path")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the synthetic corpus")
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="bench_kaldi_import.")
    try:
        dump_dir = os.path.join(work, "dump")
        os.makedirs(dump_dir)
        scp, mean_var, frames = make_dump(dump_dir, args.utterances, args.arks, args.seed)
        print(f"corpus: {args.utterances} utterances, {frames} frames x {FBANK_NUM_MEL_BINS} dims, CM-compressed, {args.arks} arks")
        outs = {name: os.path.join(work, name) for name in ("baseline", "per_utt", "ours", "ours_par")}
        for name in ("baseline", "per_utt"):
            os.makedirs(outs[name])
        times = {
            "pure-Python decoder (baseline)": timed(
                "baseline", convert_scp, scp, mean_var, outs["baseline"], read_cm_pure_python
            ),
            "kaldiio, ark reopened per utterance": timed(
                "kaldiio per utterance", convert_scp, scp, mean_var, outs["per_utt"], read_kaldiio_reopening
            ),
            "ours (import tool, 1 worker)": timed(
                "ours", import_kaldi_features.main,
                ["--scp", scp, "--mean-var", mean_var, "--out-dir", outs["ours"], "--split", "train"],
            ),
            f"ours (import tool, {args.workers} workers)": timed(
                "ours parallel", import_kaldi_features.main,
                ["--scp", scp, "--mean-var", mean_var, "--out-dir", outs["ours_par"], "--split", "train",
                 "--workers", str(args.workers)],
            ),
        }
        ours_dir = os.path.join(outs["ours"], "train")
        diff_baseline = max_difference(outs["baseline"], ours_dir)
        diff_per_utt = max_difference(outs["per_utt"], ours_dir)
        diff_parallel = max_difference(os.path.join(outs["ours_par"], "train"), ours_dir)
        print(f"max |difference| vs ours (normalised units): baseline {diff_baseline:.2e}, "
              f"kaldiio per utterance {diff_per_utt:.2e}, parallel {diff_parallel:.2e}")
        if max(diff_baseline, diff_per_utt, diff_parallel) > 1e-4:
            raise SystemExit("the decoders disagree: the timing comparison is void")

        decode_times = {
            "pure-Python decoder (baseline)": timed(
                "baseline decode only", decode_all_in_memory, scp, decode_cm_pure_python
            ),
            "kaldiio (our decoder)": timed("kaldiio decode only", decode_all_in_memory, scp, read_kaldi),
        }

        base = times["pure-Python decoder (baseline)"]
        print(f"\n{'path':<40} {'seconds':>8} {'utt/s':>9} {'frames/s':>11} {'speed-up':>9}")
        for label, seconds in times.items():
            print(f"{label:<40} {seconds:>8.2f} {args.utterances / seconds:>9.1f} "
                  f"{frames / seconds:>11.0f} {base / seconds:>8.1f}x")
        base = decode_times["pure-Python decoder (baseline)"]
        print("\ndecoding only (arks in memory, no normalisation or file writes):")
        for label, seconds in decode_times.items():
            print(f"{label:<40} {seconds:>8.2f} {args.utterances / seconds:>9.1f} "
                  f"{frames / seconds:>11.0f} {base / seconds:>8.1f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
