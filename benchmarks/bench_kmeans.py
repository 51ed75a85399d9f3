"""Benchmark k-means for Mel-HuBERT labels: fitting backends and label assignment, side by side.

1. Fit: faiss (k-means++ seeds, our default), faiss with its own random
   seeds, and scikit-learn MiniBatchKMeans with fairseq simple_kmeans'
   settings, on the same sampled frames; report fit seconds and inertia per
   frame on the fitted frames and on held-out utterances.
2. Assign: our chunked torch matmul (KMeansAssigner) vs scikit-learn
   ``MiniBatchKMeans.predict`` and a per-frame numpy argmin, with the same
   centroids; report frames/s, the speed-up and label agreement.

Frames come from ``--manifest`` (a real fbank corpus) or, by default, from a
small speech corpus synthesised with espeak-ng (varied voices, speeds and
pitches) and turned into normalised 40-dim Kaldi fbank with kaldi-native-fbank.

    python benchmarks/bench_kmeans.py                      # espeak corpus, K=512
    python benchmarks/bench_kmeans.py --manifest data/train.tsv --max-frames 500000
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from melhubert_fairseq.data.features import FBANK_NUM_MEL_BINS, MEAN_STD_NAME, MeanStdAccumulator, save_mean_std
from melhubert_fairseq.data.manifest import write_manifest
from melhubert_fairseq.kmeans import (
    FbankSource,
    KMeansAssigner,
    choose_sample_rows,
    fit_kmeans,
    sample_frames,
)

WORDS = (
    "the of and to in is was that for it with as his on be at by had not are but from or have an they which "
    "one you were her all she there would their we him been has when who will more no if out so said what up "
    "its about into than them can only other new some could time these two may then do first any my now such "
    "like our over man me even most made after also did many before must through back years where much your "
    "way well down should because each just those people how too little state good very make world still own "
    "see men work long get here between both life being under never day same another know while last might us "
    "great old year off come since against go came right used take three thought fish zebra quiet jump vivid "
    "sheep chair bridge yellow garden whisper thunder pocket knowledge measure orange purple engine shadow"
).split()


def synthesise_corpus(out_dir: str, num_utterances: int, seed: int) -> str:
    """Speak random sentences with espeak-ng, write normalised fbank .npy files and a manifest."""
    import kaldi_native_fbank as knf
    import soundfile as sf
    from scipy.signal import resample_poly

    if shutil.which("espeak-ng") is None:
        raise SystemExit("espeak-ng not found: apt-get install espeak-ng, or pass --manifest")
    rng = random.Random(seed)
    noise = np.random.default_rng(seed)
    voices = ["en-us", "en-gb", "en-gb-scotland", "en-029", "en-gb-x-rp", "en-gb-x-gbcwmd"]
    variants = ["", "+m1", "+m3", "+m5", "+f1", "+f2", "+f4", "+klatt", "+croak", "+whisper"]
    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0.0  # deterministic: we add seeded noise to the waveform instead
    opts.frame_opts.samp_freq = 16000
    opts.mel_opts.num_bins = FBANK_NUM_MEL_BINS
    raw_dir = os.path.join(out_dir, "raw")
    os.makedirs(raw_dir)
    accumulator = MeanStdAccumulator(FBANK_NUM_MEL_BINS)
    rows = []
    wav_path = os.path.join(out_dir, "tmp.wav")
    for index in range(num_utterances):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 25)))
        voice = rng.choice(voices) + rng.choice(variants)
        subprocess.run(
            ["espeak-ng", "-v", voice, "-s", str(rng.randint(120, 200)), "-p", str(rng.randint(20, 80)),
             "-w", wav_path, text], check=True, capture_output=True,
        )
        wave, rate = sf.read(wav_path, dtype="float32")
        wave = resample_poly(wave, 16000, rate).astype(np.float32)
        wave += noise.normal(scale=10 ** rng.uniform(-3.5, -2.0), size=wave.shape).astype(np.float32)
        fbank = knf.OnlineFbank(opts)
        fbank.accept_waveform(16000, (wave * 32768).tolist())
        fbank.input_finished()
        feats = np.stack([fbank.get_frame(i) for i in range(fbank.num_frames_ready)]).astype(np.float32)
        accumulator.update(feats)
        name = f"utt{index:05d}.npy"
        np.save(os.path.join(raw_dir, name), feats)
        rows.append((name, feats.shape[0]))
    os.unlink(wav_path)
    stats = accumulator.result(out_dir)
    save_mean_std(os.path.join(out_dir, MEAN_STD_NAME), stats)
    norm_dir = os.path.join(out_dir, "feats")
    os.makedirs(norm_dir)
    for name, _ in rows:
        np.save(os.path.join(norm_dir, name), stats.normalize(np.load(os.path.join(raw_dir, name))))
    shutil.rmtree(raw_dir)
    manifest = os.path.join(out_dir, "train.tsv")
    write_manifest(manifest, os.path.abspath(norm_dir), rows)
    return manifest


def held_out_frames(source: FbankSource, train_rows: np.ndarray, max_frames: int, seed: int) -> np.ndarray:
    """Frames of utterances that were not sampled for fitting (up to ``max_frames``)."""
    rest = np.setdiff1d(np.arange(len(source.manifest)), train_rows)
    rng = np.random.default_rng(seed + 1)
    frames, total = [], 0
    for row in rng.permutation(rest):
        feats = source.load(int(row))
        frames.append(feats)
        total += feats.shape[0]
        if total >= max_frames:
            break
    return np.concatenate(frames)[:max_frames]


def per_frame_argmin(frames: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Baseline: one numpy distance computation and argmin per frame."""
    return np.asarray([int(np.argmin(((centroids - x) ** 2).sum(axis=1))) for x in frames])


def best_rate(function, frames: np.ndarray, repeats: int = 3):
    """Best frames/s of ``repeats`` runs of ``function(frames)`` (the machine may be shared), and its result."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        result = function(frames)
        best = min(best, time.perf_counter() - started)
    return len(frames) / best, result


def main(argv=None) -> int:
    """Run the benchmark and print a table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", help="benchmark on this fbank manifest instead of the espeak corpus")
    parser.add_argument("--utterances", type=int, default=1200, help="espeak utterances to synthesise")
    parser.add_argument("--keep-corpus", help="write the espeak corpus here and keep it (default: temp dir)")
    parser.add_argument("--num-clusters", type=int, default=512, help="K")
    parser.add_argument("--sample-frac", type=float, default=0.8, help="fraction of frames (utterances) used for fitting")
    parser.add_argument("--max-frames", type=int, default=300_000, help="cap on fitted frames")
    parser.add_argument("--heldout-frames", type=int, default=50_000, help="held-out frames for inertia")
    parser.add_argument("--assign-frames", type=int, default=200_000, help="frames labelled in the assignment timing")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--threads", type=int, help="threads for fitting and assignment (default: all)")
    args = parser.parse_args(argv)

    tmp = None
    if args.manifest:
        manifest = args.manifest
    else:
        corpus_dir = args.keep_corpus or tempfile.mkdtemp(prefix="bench_kmeans_")
        tmp = None if args.keep_corpus else corpus_dir
        started = time.perf_counter()
        manifest = synthesise_corpus(corpus_dir, args.utterances, args.seed)
        print(f"synthesised {args.utterances} espeak utterances in {time.perf_counter() - started:.0f} s -> {manifest}")
    try:
        source = FbankSource(manifest)
        rng = np.random.default_rng([args.seed, 0, 1])  # the rows sample_frames picks for shard 0/1
        train_rows = choose_sample_rows(source.manifest.num_frames, args.sample_frac, rng)
        sample = sample_frames(source, 1, 0, args.sample_frac, args.max_frames, args.seed, progress=False)
        train = sample.frames
        heldout = held_out_frames(source, train_rows, args.heldout_frames, args.seed)
        total = int(source.manifest.num_frames.sum())
        print(f"corpus: {len(source.manifest)} utterances, {total} frames ({total / 360000:.2f} h); "
              f"fit on {train.shape[0]} frames of {sample.utterances} utterances, held-out {heldout.shape[0]} frames; "
              f"K={args.num_clusters}, dim={train.shape[1]}, threads={args.threads or os.cpu_count()} of "
              f"{os.cpu_count()} cores, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, "
              f"load average {os.getloadavg()[0]:.1f}")

        print("\n== fit ==")
        print(f"{'backend':<34}{'seconds':>9}{'inertia/frame':>15}{'held-out':>10}")
        variants = [
            ("faiss, k-means++ seeds (default)", dict(backend="faiss", init="k-means++")),
            ("faiss, random seeds", dict(backend="faiss", init="random")),
            ("sklearn MiniBatchKMeans (fairseq)", dict(backend="sklearn", init="k-means++")),
        ]
        results = {}
        for name, kwargs in variants:
            started = time.perf_counter()
            centroids = fit_kmeans(train, args.num_clusters, seed=args.seed, threads=args.threads, **kwargs)
            seconds = time.perf_counter() - started
            assigner = KMeansAssigner(centroids)
            results[name] = (seconds, assigner.inertia_per_frame(train), assigner.inertia_per_frame(heldout), centroids)
            print(f"{name:<34}{seconds:>9.1f}{results[name][1]:>15.3f}{results[name][2]:>10.3f}")
        ours, sk = results[variants[0][0]], results[variants[2][0]]
        print(f"faiss (default) vs sklearn: {sk[0] / ours[0]:.1f}x faster fit, held-out inertia "
              f"{100 * (ours[2] - sk[2]) / sk[2]:+.1f}%")

        print("\n== assign ==")
        from sklearn.cluster import MiniBatchKMeans

        centroids = ours[3]
        # A fitted sklearn model holding exactly these centroids, so predict() is timed on equal terms.
        sk_model = MiniBatchKMeans(n_clusters=args.num_clusters, init=centroids, n_init=1, max_iter=1,
                                   batch_size=args.num_clusters, max_no_improvement=1, random_state=0)
        sk_model.fit(centroids)
        sk_model.cluster_centers_ = centroids.copy()
        frames = np.concatenate([train, heldout])[: args.assign_frames]
        assigner = KMeansAssigner(centroids, threads=args.threads)
        naive = KMeansAssigner(centroids, cpu_chunk_frames=16384, threads=1)
        ours_rate, labels = best_rate(assigner.assign, frames)
        naive_rate, naive_labels = best_rate(naive.assign, frames)
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=args.threads):
            sk_rate, sk_labels = best_rate(sk_model.predict, frames)
        slow_rate, slow_labels = best_rate(lambda x: per_frame_argmin(x, centroids), frames[:5000], repeats=1)
        print(f"{'method':<40}{'frames/s':>12}{'agreement':>11}")
        print(f"{'torch chunked addmm (ours)':<40}{ours_rate:>12.0f}{'-':>11}")
        print(f"{'torch 16384-frame blocks, torch threads':<40}{naive_rate:>12.0f}{100 * np.mean(naive_labels == labels):>10.3f}%")
        print(f"{'sklearn MiniBatchKMeans.predict':<40}{sk_rate:>12.0f}{100 * np.mean(sk_labels == labels):>10.3f}%")
        print(f"{'per-frame numpy argmin':<40}{slow_rate:>12.0f}{100 * np.mean(slow_labels == labels[:5000]):>10.3f}%")
        print(f"ours vs sklearn predict: {ours_rate / sk_rate:.1f}x; vs per-frame argmin: {ours_rate / slow_rate:.0f}x")
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
