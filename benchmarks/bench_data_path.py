"""Data path cost: batch assembly, index memory and start-up of FbankLabelDataset vs fairseq's HuBERT loader.

1. Batch assembly. ``FbankLabelDataset.collater`` (memory-mapped crop reads,
   one label line read by byte offset, stack, pad) for Base batches (4 crops of
   750 model frames = max_tokens 3000), against reading every whole ``.npy``
   and whole label line first (what fairseq's HubertDataset does with audio),
   and as a fraction of one Mel-HuBERT 20 ms Base training step on the same
   batch, measured here (target <= 5 %).
2. Index memory for a synthetic LibriSpeech-960-sized manifest (281,241 rows,
   ~12.3 s average; only the .tsv and .km text files are written, plus the one
   .npy the task reads at load), measured with tracemalloc: our compact index
   (read_manifest + index_label_file + FbankLabelDataset) against fairseq's
   ``hubert_dataset.load_audio`` + ``load_label_offset`` lists (target <= 100
   bytes per utterance).
3. Start-up: wall time to open that manifest the way the task does (read,
   index labels, build the dataset, read one utterance), against fairseq's.

    python benchmarks/bench_data_path.py                       # ~1 min on 2 cores (writes a 1.3 GB .km to a temp dir)
    python benchmarks/bench_data_path.py --index-utterances 50000 --no-step   # quick
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
import tracemalloc

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from speed_common import RESULTS_DIR, save_text  # noqa: E402
from speed_models import build_mel_hubert  # noqa: E402
from speed_steps import make_optimizer, mel_hubert_train_step  # noqa: E402

from melhubert_fairseq.data.fbank_label_dataset import FbankLabelDataset  # noqa: E402
from melhubert_fairseq.data.frame_rates import FrameRates  # noqa: E402
from melhubert_fairseq.data.features import FBANK_FRAME_RATE_HZ, FBANK_NUM_MEL_BINS, stack_frames  # noqa: E402
from melhubert_fairseq.data.labels import index_label_file, write_km  # noqa: E402
from melhubert_fairseq.data.manifest import read_manifest, write_manifest  # noqa: E402

LIBRISPEECH_960_UTTERANCES = 281241
NUM_CLASSES = 512
STACK = 2  # 20 ms Base
MAX_SAMPLE_SIZE = 750
MIN_SAMPLE_SIZE = 160


def open_dataset(manifest_path: str, km_path: str) -> FbankLabelDataset:
    """What MelHubertPretrainingTask.load_dataset does for stage1.yaml (without the one-utterance read)."""
    return FbankLabelDataset(
        read_manifest(manifest_path),
        index_label_file(km_path),
        feat_dim=FBANK_NUM_MEL_BINS,
        rates=FrameRates.from_config(STACK, FBANK_FRAME_RATE_HZ),
        num_classes=NUM_CLASSES,
        max_sample_size=MAX_SAMPLE_SIZE,
        min_sample_size=MIN_SAMPLE_SIZE,
        random_crop=True,
        shuffle=True,
    )


# --- 1. batch assembly ---------------------------------------------------------------------------


def write_feature_corpus(root: str, count: int, seed: int) -> tuple:
    """``count`` random normalised fbank .npy files (15-30 s, so every Base crop is 750 frames) with 100 Hz labels."""
    rng = np.random.default_rng(seed)
    rows, labels = [], []
    for index in range(count):
        frames = int(rng.integers(2 * MAX_SAMPLE_SIZE, 3000))
        rel = f"spk{index % 8}/utt{index:05d}.npy"
        os.makedirs(os.path.join(root, os.path.dirname(rel)), exist_ok=True)
        np.save(os.path.join(root, rel), rng.standard_normal((frames, FBANK_NUM_MEL_BINS)).astype(np.float32))
        rows.append((rel, frames))
        labels.append(rng.integers(0, NUM_CLASSES, frames))
    tsv, km = os.path.join(root, "train.tsv"), os.path.join(root, "train.km")
    write_manifest(tsv, root, rows)
    write_km(km, labels)
    return tsv, km


def whole_file_collate(dataset: FbankLabelDataset, ids) -> dict:
    """Baseline assembly: load each whole .npy and whole label line, then crop, stack and pad."""
    sizes = [int(dataset.sizes[i]) for i in ids]
    target = min(min(sizes), MAX_SAMPLE_SIZE)
    source = torch.zeros(len(ids), target, FBANK_NUM_MEL_BINS * STACK)
    labels = torch.full((len(ids), target), -100, dtype=torch.long)
    for row, (index, size) in enumerate(zip(ids, sizes)):
        feats = np.load(dataset.manifest.full_path(index))
        with open(dataset.label_path, "rb") as handle:
            handle.seek(int(dataset.label_offsets[index]))
            line = np.array(handle.readline().split(), dtype=np.int64)
        start = dataset.crop_start(index, size, target, dataset.epoch)
        source[row] = torch.from_numpy(stack_frames(feats, STACK)[start : start + target])
        labels[row] = torch.from_numpy(line[::STACK][start : start + target])
    return {"source": source, "target": labels}


def time_batches(function, batches) -> float:
    """Median seconds of ``function(batch)`` over ``batches``."""
    times = []
    for ids in batches:
        start = time.perf_counter()
        function(ids)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# --- 2./3. index memory and start-up -------------------------------------------------------------


def write_index_corpus(root: str, count: int, mean_seconds: float, seed: int) -> tuple:
    """LibriSpeech-shaped train.tsv / train.km text files of ``count`` rows (one real .npy, for row 0)."""
    rng = np.random.default_rng(seed)
    frames = np.clip(rng.normal(mean_seconds * FBANK_FRAME_RATE_HZ, 350, count), MIN_SAMPLE_SIZE * STACK + 40, 3500).astype(np.int64)
    rows = []
    for index in range(count):
        speaker, chapter = 100 + index % 2338, 1000 + (index // 37) % 9000
        rows.append((f"train-960/{speaker}/{chapter}/{speaker}-{chapter}-{index % 10000:04d}.npy", int(frames[index])))
    tsv = os.path.join(root, "train.tsv")
    write_manifest(tsv, root, rows)
    first = os.path.join(root, rows[0][0])
    os.makedirs(os.path.dirname(first), exist_ok=True)
    np.save(first, rng.standard_normal((int(frames[0]), FBANK_NUM_MEL_BINS)).astype(np.float32))

    # Label lines: prefixes of a few long random lines (content does not matter, size does).
    pool = []
    for _ in range(16):
        tokens = [str(v).encode() for v in rng.integers(0, NUM_CLASSES, int(frames.max()))]
        line = b" ".join(tokens)
        ends = np.cumsum([len(t) + 1 for t in tokens]) - 1  # byte after the n-th token
        pool.append((line, ends))
    km = os.path.join(root, "train.km")
    with open(km, "wb") as handle:
        chunk = []
        for index in tqdm(range(count), desc="writing train.km", unit="utt", mininterval=5):
            line, ends = pool[index % len(pool)]
            chunk.append(line[: ends[frames[index] - 1]])
            if len(chunk) == 4096:
                handle.write(b"\n".join(chunk) + b"\n")
                chunk = []
        if chunk:
            handle.write(b"\n".join(chunk) + b"\n")
    return tsv, km


def fairseq_index(manifest_path: str, km_path: str):
    """fairseq HuBERT's in-memory index of the same files (names, sizes, label byte ranges)."""
    from fairseq.data.audio.hubert_dataset import load_audio, load_label_offset

    root, names, inds, tot, sizes = load_audio(manifest_path, None, MIN_SAMPLE_SIZE * STACK)
    offsets = load_label_offset(km_path, inds, tot)
    return root, names, inds, sizes, offsets


def traced_bytes(build) -> tuple:
    """(bytes still held by ``build()``'s result, peak bytes while building), via tracemalloc."""
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    result = build()
    gc.collect()
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del result
    return held - base, peak - base


def ours_open_with_first_read(tsv: str, km: str) -> FbankLabelDataset:
    """The task's load_dataset: open the dataset, then read utterance 0 fully."""
    dataset = open_dataset(tsv, km)
    dataset.read_frames(0, 0, int(dataset.sizes[0]))
    return dataset


def main(argv=None) -> None:
    """Run the three measurements, print and save the tables."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--utterances", type=int, default=64, help="feature files written for the batch assembly test")
    parser.add_argument("--batch-size", type=int, default=4, help="crops per batch (Base: max_tokens 3000 / 750)")
    parser.add_argument("--batches", type=int, default=30, help="batches timed per assembly path (median)")
    parser.add_argument("--no-step", action="store_true", help="skip timing the training step (no fraction)")
    parser.add_argument("--step-repeats", type=int, default=1, help="timed training steps after one warm-up")
    parser.add_argument("--index-utterances", type=int, default=LIBRISPEECH_960_UTTERANCES, help="rows of the synthetic manifest")
    parser.add_argument("--mean-seconds", type=float, default=12.3, help="average utterance length of the synthetic manifest")
    parser.add_argument("--workdir", default=None, help="where to write the synthetic files (default: a temp dir, removed after)")
    parser.add_argument("--results-dir", default=RESULTS_DIR, help="where the result table is written")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    lines = []

    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        # 1. batch assembly
        corpus = os.path.join(work, "features")
        tsv, km = write_feature_corpus(corpus, args.utterances, seed=0)
        dataset = open_dataset(tsv, km)
        rng = np.random.default_rng(1)
        batches = [[int(i) for i in rng.choice(len(dataset), args.batch_size, replace=False)] for _ in range(args.batches)]
        for ids in batches[:2]:  # warm the page cache for both paths alike
            dataset.collater([{"id": i} for i in ids])
            whole_file_collate(dataset, ids)
        ours = time_batches(lambda ids: dataset.collater([{"id": i} for i in ids]), batches)
        whole = time_batches(lambda ids: whole_file_collate(dataset, ids), batches)
        batch = dataset.collater([{"id": i} for i in batches[0]])
        shape = tuple(batch["net_input"]["source"].shape)
        lines += [
            f"## Batch assembly ({args.batch_size} crops x {shape[1]} frames at 20 ms, median of {args.batches})",
            "",
            "| path | ms per batch | speed (whole-file = 1) |",
            "|---|---|---|",
            f"| FbankLabelDataset.collater (mmap crop + label line by offset) | {ours * 1e3:.2f} | {whole / ours:.2f}x |",
            f"| whole .npy + whole label line, then crop | {whole * 1e3:.2f} | 1.00x |",
            "",
        ]
        if not args.no_step:
            model = build_mel_hubert(STACK)
            step = mel_hubert_train_step(model, make_optimizer(model, "mel_hubert"), batch["net_input"]["source"], torch.device("cpu"), "fp32")
            step()
            step_times = []
            for _ in range(args.step_repeats):
                start = time.perf_counter()
                step()
                step_times.append(time.perf_counter() - start)
            step_seconds = statistics.median(step_times)
            del model, step
            lines += [
                f"Training step (20 ms Base, fp32, {torch.get_num_threads()} CPU threads) on that batch: {step_seconds:.2f} s; "
                f"batch assembly = {100 * ours / step_seconds:.3f} % of it (target <= 5 %)",
                "",
            ]
        print("\n".join(lines))

        # 2./3. index memory and start-up at LibriSpeech-960 size
        index_dir = os.path.join(work, "index")
        os.makedirs(index_dir)
        print(f"writing a {args.index_utterances}-row manifest and its labels ...")
        tsv, km = write_index_corpus(index_dir, args.index_utterances, args.mean_seconds, seed=2)
        km_gb = os.path.getsize(km) / 1e9
        gc.collect()
        start = time.perf_counter()
        opened = ours_open_with_first_read(tsv, km)
        ours_start = time.perf_counter() - start
        kept = len(opened)
        del opened
        gc.collect()
        start = time.perf_counter()
        fairseq_index(tsv, km)
        fairseq_start = time.perf_counter() - start
        ours_held, ours_peak = traced_bytes(lambda: open_dataset(tsv, km))
        fairseq_held, fairseq_peak = traced_bytes(lambda: fairseq_index(tsv, km))
        n = args.index_utterances
        lines += [
            f"## Index of a {n}-row manifest ({kept} kept, labels {km_gb:.2f} GB of text)",
            "",
            "| loader | bytes per utterance held | peak while opening (MB) | start-up s |",
            "|---|---|---|---|",
            f"| ours: read_manifest + index_label_file + FbankLabelDataset (+ 1 utterance read) | {ours_held / n:.1f} | {ours_peak / 1e6:.0f} | {ours_start:.2f} |",
            f"| fairseq hubert_dataset: load_audio + load_label_offset | {fairseq_held / n:.1f} | {fairseq_peak / 1e6:.0f} | {fairseq_start:.2f} |",
            "",
            f"ours holds {fairseq_held / max(ours_held, 1):.1f}x less than fairseq's lists (target <= 100 bytes per utterance)",
        ]
    text = "\n".join(lines)
    print("\n".join(lines[-8:]))
    save_text(os.path.join(args.results_dir, "data_path_cpu.md"), text)
    print(f"done: {args.utterances} + {args.index_utterances} utterances, {time.perf_counter() - started:.0f} s taken")


if __name__ == "__main__":
    main()
