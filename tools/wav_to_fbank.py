"""Turn 16 kHz audio into normalised 40-dim Kaldi fbank ``.npy`` features and a feature manifest.

Input is either a fairseq audio manifest (first line the root directory, then
``relative/path.wav<TAB>num_samples``; a relative root is taken relative to the
manifest's own folder, as for every manifest) or ``--audio-dir`` (every .wav/.flac below it,
sorted). Output, in ``--out-dir``:

* ``<relative/path>.npy`` per utterance: (frames, 40) fbank, float32 (or
  ``--dtype float16``), exactly the original Mel-HuBERT features;
* ``mean-std.npy``: (2, 40) corpus mean and std of the raw log-Mel features,
  accumulated in float64 in the same pass that computes them (with
  ``--no-normalize``: ``{split}.mean-std.npy``; with ``--mean-std``: none);
* ``{split}.features.json``: whether the features are normalised and with
  which statistics, which training checks (melhubert_fairseq.data.features.FeatureNormalization);
* ``{split}.tsv``: feature manifest (root = the output directory, relative
  ``.npy`` paths, frame counts), written last.

Features are normalised with the corpus statistics by default: the raw
features go to a private staging directory, and a second, I/O-only pass
normalises them there once the statistics are known (fbank is never computed
twice). ``--mean-std FILE`` normalises with given statistics in one pass
(dev/test splits with the train statistics); ``--no-normalize`` keeps the raw
log-Mel values. Everything is staged (melhubert_fairseq.atomic_output.StagedOutputs)
and renamed into place only after every utterance succeeded, the manifest
last; with ``--overwrite`` the old manifest is moved aside before any feature
file is replaced. A failure leaves nothing behind, and a run that was killed
is cleaned up (or rolled back) by the next run.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, List, Optional

import numpy as np

from melhubert_fairseq.disk_full import save_npy
from melhubert_fairseq.output_guards import check_writable, refuse_replacing_inputs
from melhubert_fairseq.staged_outputs import StagedOutputs
from melhubert_fairseq.data.fbank import compute_fbank, load_audio
from melhubert_fairseq.data.features import (
    FBANK_FRAME_RATE_HZ,
    FBANK_NUM_MEL_BINS,
    FBANK_SAMPLE_RATE,
    FBANK_WINDOW_SAMPLES,
    MEAN_STD_NAME,
    FeatureNormalization,
    MeanStd,
    MeanStdAccumulator,
    load_mean_std,
    normalization_record_path,
    raw_stats_name,
    save_mean_std,
)
from melhubert_fairseq.data.audio_manifest import AudioItem, list_audio_dir, read_audio_manifest
from melhubert_fairseq.data.manifest import write_manifest
from melhubert_fairseq.cli import console_main, with_progress
from melhubert_fairseq.errors import InputError

@dataclass(frozen=True)
class ExtractOptions:
    """Per-utterance settings shared by all workers."""

    staging_dir: str  # mirrors --out-dir
    dtype: str
    resample: bool
    downmix: bool
    stats: Optional[MeanStd]  # normalise with these at once; None: write raw features
    raw_for_second_pass: bool  # raw float32 now, normalised later by normalize_staged


@dataclass
class ExtractResult:
    """What one worker reports back about one utterance."""

    num_frames: int
    num_samples: int
    accumulator: Optional[MeanStdAccumulator]


def check_outputs(
    items: List[AudioItem], out_dir: str, output_names: List[str], overwrite: bool, input_files: List[str]
) -> None:
    """Fail before any work if two inputs share a feature file, an output is an input (the audio, the
    manifest, ``input_files``: also with --overwrite), or outputs exist (without --overwrite)."""
    seen = {}
    for item in items:
        other = seen.setdefault(item.feature_path, item)
        if other is not item:
            raise InputError(f"{other.where} and {item.where} would both be written to {item.feature_path}")
    refuse_replacing_inputs(
        [os.path.join(out_dir, item.feature_path) for item in items] + [os.path.join(out_dir, name) for name in output_names],
        itertools.chain(input_files, (item.full_path for item in items)),
    )
    for name in output_names:
        check_writable(os.path.join(out_dir, name), overwrite)
    if not overwrite:
        existing = [item.feature_path for item in items if os.path.exists(os.path.join(out_dir, item.feature_path))]
        if existing:
            raise FileExistsError(
                f"{len(existing)} feature files already exist in {out_dir} (first: {existing[0]}); "
                "refusing to overwrite them (pass --overwrite to replace them)"
            )


def extract_one(item: AudioItem, options: ExtractOptions) -> ExtractResult:
    """Compute, account for and stage one utterance's fbank; errors name the utterance."""
    try:
        waveform = load_audio(
            item.full_path, resample=options.resample, downmix=options.downmix, expected_samples=item.expected_samples
        )
    except (OSError, ValueError) as err:
        raise InputError(f"{item.where}: {err}") from None
    feats = compute_fbank(waveform, FBANK_SAMPLE_RATE)
    if len(feats) == 0:
        return ExtractResult(0, len(waveform), None)
    accumulator = None
    if options.stats is None:
        accumulator = MeanStdAccumulator(FBANK_NUM_MEL_BINS)
        accumulator.update(feats)
    if options.stats is not None:
        feats = options.stats.normalize(feats)
    if not options.raw_for_second_pass:
        feats = feats.astype(options.dtype, copy=False)
    save_npy(os.path.join(options.staging_dir, item.feature_path), feats)
    return ExtractResult(len(feats), len(waveform), accumulator)


def normalize_staged(path: str, stats: MeanStd, dtype: str) -> None:
    """Second pass: replace a staged raw feature file by its normalised version."""
    save_npy(path, stats.normalize(np.load(path)).astype(dtype, copy=False))


def run_parallel(func: Callable, tasks: Iterable, total: int, workers: int, desc: str) -> Iterator:
    """``map(func, tasks)`` in order, over ``workers`` processes (1: in this process), with progress."""
    pool = multiprocessing.Pool(workers) if workers > 1 else None
    with pool if pool is not None else contextlib.nullcontext():
        results = pool.imap(func, tasks, chunksize=4) if pool is not None else map(func, tasks)
        yield from with_progress(results, total=total, desc=desc, unit="utt")


def _extract_task(task):
    return extract_one(*task)


def _normalize_task(task):
    return normalize_staged(*task)


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifest", help="fairseq audio manifest (root line, then relative/path<TAB>num_samples)")
    source.add_argument("--audio-dir", help="directory searched recursively for .wav/.flac files")
    parser.add_argument("--out-dir", required=True, help="output directory for .npy features, mean-std.npy and the manifest")
    parser.add_argument("--split", help="manifest name {split}.tsv (default: the input manifest's name, or 'train')")
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="dtype of the feature files")
    norm = parser.add_mutually_exclusive_group()
    norm.add_argument("--no-normalize", action="store_true", help="write raw log-Mel features and their statistics as {split}.mean-std.npy (train with task.mean_std_path)")
    norm.add_argument("--mean-std", help="normalise with this (2, 40) mean-std.npy instead of this split's statistics")
    parser.add_argument("--resample", action="store_true", help="resample audio that is not 16 kHz (default: error)")
    parser.add_argument("--downmix", action="store_true", help="average the channels of multi-channel audio (default: error)")
    parser.add_argument("--workers", type=int, default=1, help="parallel worker processes (default: 1)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing features, mean-std.npy and manifest")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.split is None:
        args.split = os.path.splitext(os.path.basename(args.manifest))[0] if args.manifest else "train"
    return args


@console_main
def main(argv: Optional[List[str]] = None) -> None:
    """Command-line entry point."""
    args = parse_args(argv)
    start = time.perf_counter()
    items = read_audio_manifest(args.manifest) if args.manifest else list_audio_dir(args.audio_dir)
    given_stats = None
    if args.mean_std:
        given_stats = load_mean_std(args.mean_std)
        if given_stats.dim != FBANK_NUM_MEL_BINS:
            raise InputError(f"{args.mean_std}: has {given_stats.dim} dims, fbank features have {FBANK_NUM_MEL_BINS}")
    out_dir = os.path.abspath(args.out_dir)
    manifest_name = f"{args.split}.tsv"
    record_name = os.path.basename(normalization_record_path(manifest_name))
    computes_stats = given_stats is None
    # Raw features get their statistics under their split's name: a mean-std.npy means "normalised by this".
    stats_name = raw_stats_name(args.split) if args.no_normalize else MEAN_STD_NAME
    output_names = [manifest_name, record_name] + ([stats_name] if computes_stats else [])

    with StagedOutputs(f"{args.split}.wav_to_fbank", [out_dir], args.overwrite) as staged:
        # After the recovery on entry: files a killed run published are gone again.
        check_outputs(items, out_dir, output_names, args.overwrite, [p for p in (args.manifest, args.mean_std) if p])
        options = ExtractOptions(
            staging_dir=staged.mirror(out_dir),
            dtype=args.dtype,
            resample=args.resample,
            downmix=args.downmix,
            stats=given_stats,
            raw_for_second_pass=computes_stats and not args.no_normalize,
        )
        totals = MeanStdAccumulator(FBANK_NUM_MEL_BINS)
        kept, skipped, total_samples = [], [], 0
        tasks = ((item, options) for item in items)
        for item, result in zip(items, run_parallel(_extract_task, tasks, len(items), args.workers, "fbank")):
            total_samples += result.num_samples
            if result.num_frames == 0:
                skipped.append(item)
                print(
                    f"skipped {item.where}: {item.full_path} has {result.num_samples} samples, shorter than one "
                    f"{FBANK_WINDOW_SAMPLES}-sample (25 ms) window",
                    file=sys.stderr,
                )
                continue
            kept.append((item.feature_path, result.num_frames))
            if result.accumulator is not None:
                totals.merge(result.accumulator)
        if not kept:
            raise InputError(f"no utterance produced any fbank frame ({len(skipped)} skipped as too short)")

        stats = totals.result(f"fbank statistics of {args.manifest or args.audio_dir}") if computes_stats else None
        if options.raw_for_second_pass:
            normalise = [(os.path.join(options.staging_dir, rel), stats, args.dtype) for rel, _ in kept]
            for _ in run_parallel(_normalize_task, normalise, len(normalise), args.workers, "normalise"):
                pass
        finals = [os.path.join(out_dir, rel) for rel, _ in kept]
        if stats is not None:
            finals.append(os.path.join(out_dir, stats_name))
            save_mean_std(staged.path(finals[-1]), stats)
        finals.append(os.path.join(out_dir, record_name))
        stats_path = os.path.abspath(args.mean_std) if given_stats is not None else os.path.join(out_dir, stats_name)
        FeatureNormalization(not args.no_normalize, stats_path, "melhubert-wav-to-fbank").write(
            staged.path(finals[-1]), os.path.join(out_dir, manifest_name)
        )
        finals.append(os.path.join(out_dir, manifest_name))
        write_manifest(staged.path(finals[-1]), out_dir, kept)
        staged.publish(finals)

    seconds = time.perf_counter() - start
    frames = sum(count for _, count in kept)
    audio_seconds = total_samples / FBANK_SAMPLE_RATE
    normalised = (
        f"raw log-Mel (statistics: {stats_name})" if args.no_normalize
        else f"normalised by {args.mean_std if given_stats else MEAN_STD_NAME}"
    )
    print(
        f"{args.split}: {len(kept)} utterances ({len(skipped)} skipped), "
        f"{frames / FBANK_FRAME_RATE_HZ / 3600:.3f} hours, {frames} frames, {seconds:.1f} s, "
        f"{audio_seconds / seconds:.0f}x real time with {args.workers} worker(s); "
        f"{args.dtype} {normalised} -> {os.path.join(out_dir, manifest_name)}"
    )


if __name__ == "__main__":
    sys.exit(main())
