"""Import the original Mel-HuBERT release's Kaldi fbank dump into ``.npy`` features and a manifest.

Input: a Kaldi scp (``utt_id <path>.ark:<offset>``) pointing into binary arks
of 40-dim fbank matrices (compressed ``CM``/``CM2``/``CM3`` or plain
float/double), and the dump's ``.mean-var`` (or a ``mean-std.npy``). The scp
was written on another machine, so an ark whose written path does not exist
is looked up by file name in ``--ark-dir`` and in the scp's own folder.

Output, in ``--out-dir``: one normalised ``{feature-dir}/{utt_id}.npy`` per
utterance, ``mean-std.npy`` (2, dim; with ``--no-normalize``, raw features and
``{split}.mean-std.npy``), ``{split}.features.json`` (whether the features are
normalised, and by what: checked by training) and, written last, ``{split}.tsv``.
Features are written into a hidden staging folder that is renamed into place
only after every utterance was read, then mean-std.npy and, last, the manifest
(melhubert_fairseq.atomic_output.StagedOutputs): a bad utterance leaves nothing
behind, ``--overwrite`` moves the old manifest aside before the old features,
and a killed run is cleaned up (or rolled back) by the next one.

Example::

    melhubert-import-kaldi-features --scp libri-360/train-clean-360.scp \\
        --mean-var libri-360/train-clean-360.mean-var --out-dir data/libri360
"""
from __future__ import annotations

import sys
import argparse
import concurrent.futures
import os
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from melhubert_fairseq.disk_full import save_npy
from melhubert_fairseq.output_guards import check_writable, refuse_replacing_inputs
from melhubert_fairseq.staged_outputs import StagedOutputs
from melhubert_fairseq.data.features import (
    MEAN_STD_NAME,
    FeatureNormalization,
    MeanStd,
    check_feature_array,
    load_mean_std,
    normalization_record_path,
    raw_stats_name,
    save_mean_std,
)
from melhubert_fairseq.data.kaldi import ScpEntry, load_normalization_stats, read_feature_matrix, read_scp, resolve_ark_paths
from melhubert_fairseq.data.manifest import write_manifest
from melhubert_fairseq.cli import console_main, progress_bar, summary_line
from melhubert_fairseq.errors import InputError

#: Utterances per work unit: one ark handle, offsets read in increasing order.
CHUNK_UTTERANCES = 256

#: (scp index, utterance id, byte offset) of one utterance in a chunk.
ChunkItem = Tuple[int, str, int]


@dataclass(frozen=True)
class FeatureJob:
    """Settings every chunk of one import shares (picklable, sent to worker processes)."""

    feature_dir: str
    stats: MeanStd
    stats_source: str
    normalize: bool
    dtype: str
    check_key: bool


def prepare_features(feats: np.ndarray, utt_id: str, ark_path: str, job: FeatureJob) -> np.ndarray:
    """Check one raw matrix (the shared feature check: dim, frames, finite) and return it normalised
    in the output dtype."""
    # float64 (DM) matrices are read as float32, as every feature is; a value beyond float32 becomes inf.
    feats = check_feature_array(
        feats.astype(np.float32, copy=False), f"{ark_path} (utterance {utt_id})", "its matrix",
        expected_dim=job.stats.dim, dim_name=f"the dim of {job.stats_source}",
    )
    out = job.stats.normalize(feats) if job.normalize else feats
    if job.dtype != "float32":
        out = out.astype(job.dtype)
        if not np.isfinite(out).all():
            raise InputError(
                f"{ark_path}: utterance {utt_id} overflows {job.dtype} after normalisation; use --dtype float32"
            )
    return out


def import_chunk(job: FeatureJob, ark_path: str, items: Sequence[ChunkItem]) -> List[Tuple[int, int]]:
    """Convert one chunk of utterances from one ark; return ``(scp index, frames)`` per utterance."""
    done = []
    with open(ark_path, "rb") as handle:
        for index, utt_id, offset in items:
            feats = read_feature_matrix(handle, offset, utt_id, ark_path, job.check_key)
            out = prepare_features(feats, utt_id, ark_path, job)
            save_npy(os.path.join(job.feature_dir, f"{utt_id}.npy"), out)
            done.append((index, int(out.shape[0])))
    return done


def plan_chunks(
    entries: Sequence[ScpEntry], resolved: Dict[str, str], chunk_size: int = CHUNK_UTTERANCES
) -> List[Tuple[str, List[ChunkItem]]]:
    """Group utterances by ark and sort each ark's by offset, so every chunk reads one file front to back."""
    by_ark: Dict[str, List[ChunkItem]] = {}
    for index, entry in enumerate(entries):
        by_ark.setdefault(resolved[entry.written_path], []).append((index, entry.utt_id, entry.offset))
    chunks = []
    for ark_path, items in by_ark.items():
        items.sort(key=lambda item: item[2])
        for start in range(0, len(items), chunk_size):
            chunks.append((ark_path, items[start : start + chunk_size]))
    return chunks


def run_chunks(
    job: FeatureJob, chunks: Sequence[Tuple[str, List[ChunkItem]]], num_utts: int, workers: int
) -> np.ndarray:
    """Run every chunk (in-process or on ``workers`` processes); return frames per scp index."""
    frames = np.zeros(num_utts, dtype=np.int64)
    with progress_bar(total=num_utts, desc="features", unit="utt", mininterval=1.0) as progress:
        if workers <= 1:
            for ark_path, items in chunks:
                for index, count in import_chunk(job, ark_path, items):
                    frames[index] = count
                progress.update(len(items))
            return frames
        with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(import_chunk, job, ark, items) for ark, items in chunks]
            try:
                for future in concurrent.futures.as_completed(futures):
                    done = future.result()
                    for index, count in done:
                        frames[index] = count
                    progress.update(len(done))
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    return frames


def check_feature_dir_replaceable(feature_dir: str, overwrite: bool) -> None:
    """Refuse to replace an existing non-empty feature folder without --overwrite, or one holding non-features."""
    if not os.path.isdir(feature_dir):
        if os.path.exists(feature_dir):
            raise FileExistsError(f"{feature_dir} exists and is not a folder")
        return
    names = os.listdir(feature_dir)
    if not names:
        return
    if not overwrite:
        raise FileExistsError(
            f"{feature_dir} already holds {len(names)} files; refusing to overwrite it (pass --overwrite to replace it)"
        )
    foreign = [n for n in names if not (n.endswith(".npy") and os.path.isfile(os.path.join(feature_dir, n)))]
    if foreign:
        raise FileExistsError(
            f"{feature_dir} holds entries other than .npy features ({', '.join(sorted(foreign)[:5])}); "
            "refusing to replace it even with --overwrite: choose another --feature-dir"
        )


def check_mean_std_writable(path: str, stats: MeanStd, overwrite: bool) -> bool:
    """True if ``mean-std.npy`` must be written; an existing one with the same values is kept."""
    if overwrite or not os.path.exists(path):
        return True
    existing = load_mean_std(path)
    if existing.dim == stats.dim and np.allclose(existing.to_array(), stats.to_array(), rtol=1e-6, atol=0):
        return False
    raise FileExistsError(
        f"{path} already exists with different statistics; pass --overwrite to replace it"
    )


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface of the feature importer."""
    parser = argparse.ArgumentParser(
        prog="melhubert-import-kaldi-features",
        description="Convert a Kaldi fbank dump (scp/ark + .mean-var) into normalised .npy features, "
        "mean-std.npy and a {split}.tsv manifest.",
    )
    parser.add_argument("--scp", required=True, help="Kaldi feature scp: 'utt_id <path>.ark:<offset>' per line")
    parser.add_argument(
        "--mean-var",
        required=True,
        help="the dump's .mean-var file ([sums], [sums of squares], frame count) or a (2, dim) mean-std.npy",
    )
    parser.add_argument("--out-dir", required=True, help="folder for {split}.tsv, mean-std.npy and the features")
    parser.add_argument("--split", help="manifest name (default: the scp file name without .scp)")
    parser.add_argument(
        "--feature-dir", help="folder for the per-utterance .npy files (default: OUT_DIR/SPLIT)"
    )
    parser.add_argument(
        "--ark-dir",
        help="folder holding the arks when the paths written in the scp do not exist "
        "(the scp's own folder is searched too)",
    )
    parser.add_argument(
        "--dtype", choices=("float32", "float16"), default="float32", help="dtype of the written features"
    )
    parser.add_argument(
        "--no-normalize",
        action="store_true",
        help="write raw fbank instead of (x - mean) / std, and the statistics as {split}.mean-std.npy (train with task.mean_std_path)",
    )
    parser.add_argument(
        "--skip-key-check",
        action="store_true",
        help="do not check that each scp offset points just past 'utt_id ' in its ark",
    )
    parser.add_argument("--workers", type=int, default=1, help="worker processes (each reads whole chunks of one ark)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    return parser


@console_main
def main(argv: Optional[Sequence[str]] = None) -> Dict[str, str]:
    """Run the feature import; return the paths written by kind."""
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    split = args.split or os.path.basename(args.scp).removesuffix(".scp")
    out_dir = os.path.abspath(args.out_dir)
    feature_dir = os.path.abspath(args.feature_dir or os.path.join(out_dir, split))
    if feature_dir == out_dir:
        raise InputError(f"--feature-dir must be a folder of its own, not the output folder {out_dir}")
    manifest_path = os.path.join(out_dir, f"{split}.tsv")
    # Raw features' statistics carry the split's name: a mean-std.npy means "normalised by this".
    mean_std_path = os.path.join(out_dir, raw_stats_name(split) if args.no_normalize else MEAN_STD_NAME)
    record_path = normalization_record_path(manifest_path)

    stats = load_normalization_stats(args.mean_var)
    entries = read_scp(args.scp)
    resolved = resolve_ark_paths(entries, args.scp, args.ark_dir)
    chunks = plan_chunks(entries, resolved)

    roots = [out_dir]
    if os.path.commonpath([out_dir, feature_dir]) != out_dir:
        roots.append(os.path.dirname(feature_dir))  # staged on the feature folder's own file system
    with StagedOutputs(f"{split}.import_kaldi_features", roots, args.overwrite) as staged:
        # After the recovery on entry, which undoes what a killed run had published.
        # The statistics given as input are never rewritten onto themselves, even with --overwrite.
        reads_own_output = os.path.realpath(args.mean_var) == os.path.realpath(mean_std_path)
        refuse_replacing_inputs(
            [manifest_path, record_path, feature_dir] + ([] if reads_own_output else [mean_std_path]),
            [args.scp, *resolved.values()] + ([] if reads_own_output else [args.mean_var]),
        )
        check_writable(manifest_path, args.overwrite)
        check_writable(record_path, args.overwrite)
        check_feature_dir_replaceable(feature_dir, args.overwrite)
        need_mean_std = not reads_own_output and check_mean_std_writable(mean_std_path, stats, args.overwrite)
        staged_features = staged.path(feature_dir)
        os.mkdir(staged_features)
        job = FeatureJob(staged_features, stats, args.mean_var, not args.no_normalize, args.dtype, not args.skip_key_check)
        frames = run_chunks(job, chunks, len(entries), args.workers)
        written = {"features": feature_dir}
        finals = [feature_dir]
        if need_mean_std:
            save_mean_std(staged.path(mean_std_path), stats)
            finals.append(mean_std_path)
            written["mean/std"] = mean_std_path
        FeatureNormalization(not args.no_normalize, mean_std_path, "melhubert-import-kaldi-features").write(
            staged.path(record_path), manifest_path
        )
        finals.append(record_path)
        rows = ((f"{entry.utt_id}.npy", count) for entry, count in zip(entries, frames.tolist()))
        write_manifest(staged.path(manifest_path), feature_dir, rows)
        finals.append(manifest_path)
        written["manifest"] = manifest_path
        check_feature_dir_replaceable(feature_dir, args.overwrite)
        if os.path.isdir(feature_dir) and not os.listdir(feature_dir):
            os.rmdir(feature_dir)  # an empty folder is replaced without --overwrite
        staged.publish(finals)
    print(summary_line("imported", len(entries), int(frames.sum()), time.perf_counter() - start, written))
    return written


if __name__ == "__main__":
    sys.exit(main())
