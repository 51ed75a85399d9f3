"""Learn k-means centroids on sampled frames of a manifest (fbank or a checkpoint layer).

Three ways to run it:

* unsharded (default): sample ``--sample-frac`` of the manifest's frames,
  fit, write ``--km-path`` (``.npy`` centroids + ``.json`` sidecar);
* ``--nshard N --rank R --sample-dir DIR``: only sample shard R and write
  ``DIR/{split}_{R}_{N}.npy`` (+ ``.json``), e.g. one job per machine;
* ``--nshard N --sample-dir DIR`` (no ``--rank``): load the N sample shards,
  fit and write ``--km-path``.

Stage 1 clusters the (normalised) fbank frames; stage 2 passes
``--checkpoint CKPT --layer L`` to cluster that layer's hidden states.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import List, Optional

import numpy as np

from melhubert_fairseq.output_guards import check_writable, refuse_replacing_inputs
from melhubert_fairseq.data.shards import split_name
from melhubert_fairseq.kmeans import (
    BACKENDS,
    DEFAULT_BACKEND,
    DEFAULT_ITERATIONS,
    FALLBACK_BACKEND,
    FrameSample,
    KMeansAssigner,
    KMeansModel,
    add_feature_source_arguments,
    feature_source_from_args,
    fit_kmeans,
    load_sample,
    resolve_backend,
    sample_frames,
    save_kmeans,
    save_sample,
    sidecar_path,
)
from melhubert_fairseq.cli import console_main, set_torch_threads
from melhubert_fairseq.errors import InputError


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags of learn_kmeans."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True, help="{split}.tsv manifest of fbank .npy files")
    parser.add_argument("--km-path", help="output centroids .npy (a .json sidecar is written beside it)")
    parser.add_argument("--split", help="split name for sample shard files (default: manifest file name)")
    add_feature_source_arguments(parser)
    parser.add_argument("--num-clusters", type=int, default=512, help="K, the number of clusters")
    parser.add_argument("--sample-frac", type=float, default=0.1, help="fraction of the frames to sample, as random whole utterances (1 = all)")
    parser.add_argument("--max-frames", type=int, default=2_000_000, help="at most this many frames are fitted (split evenly over shards); 0 = no cap")
    parser.add_argument("--seed", type=int, default=0, help="seed for sampling and k-means initialisation")
    parser.add_argument("--backend", choices=BACKENDS, help=f"k-means implementation (default: {DEFAULT_BACKEND} when installed, the [faiss] extra, else {FALLBACK_BACKEND}; faiss measured faster and better, see benchmarks/bench_kmeans.py)")
    parser.add_argument("--iterations", type=int, help=f"faiss: Lloyd iterations, sklearn: max epochs (default {DEFAULT_ITERATIONS})")
    parser.add_argument("--threads", type=int, help="CPU threads for fitting, the model and assignment (default: all; on a machine busy with other jobs 1 can be faster, see README)")
    parser.add_argument("--nshard", type=int, default=1, help="split the manifest into this many shards")
    parser.add_argument("--rank", type=int, help="only sample this shard into --sample-dir (no fitting)")
    parser.add_argument("--sample-dir", help="where sample shards are written (--rank) or read (--nshard > 1 without --rank)")
    parser.add_argument("--no-progress", action="store_true", help="hide the tqdm progress bar")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    return parser


def hours(frames: int, frame_rate_hz: float) -> float:
    """Hours of audio covered by ``frames`` frames at ``frame_rate_hz``."""
    return frames / frame_rate_hz / 3600


def shard_max_frames(max_frames: int, nshard: int) -> Optional[int]:
    """Each shard's share of ``--max-frames`` (None when uncapped)."""
    return math.ceil(max_frames / nshard) if max_frames > 0 else None


def sample_shard_path(args, split: str, rank: int) -> str:
    """``{sample_dir}/{split}_{rank}_{nshard}.npy``."""
    return os.path.join(args.sample_dir, f"{split}_{rank}_{args.nshard}.npy")


def same_path(given: Optional[str], recorded: Optional[str]) -> bool:
    """Whether a path flag names the file recorded in a sample sidecar."""
    return os.path.abspath(given) == recorded if given is not None else True


def load_sample_shards(args, split: str):
    """Load and cross-check every sample shard; return (frames, utterances, source frames, shard 0's sidecar)."""
    paths = [sample_shard_path(args, split, rank) for rank in range(args.nshard)]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {args.nshard} sample shards are missing (run --rank R for each): {missing[:5]}"
        )
    samples: List[FrameSample] = []
    source = None
    for rank, path in enumerate(paths):
        sample, meta = load_sample(path)
        if meta.get("rank") != rank or meta.get("nshard") != args.nshard:
            raise InputError(f"{path}: sidecar says shard {meta.get('rank')}/{meta.get('nshard')}, expected {rank}/{args.nshard}")
        if source is None:
            source, first_path, first = meta["feature_source"], path, meta
        elif any(meta[key] != first[key] for key in ("feature_source", "sample_seed", "sample_frac")):
            raise InputError(
                f"{path}: sampled from {meta['feature_source']} (seed {meta['sample_seed']}, frac "
                f"{meta['sample_frac']}) but {first_path} from {source} (seed {first['sample_seed']}, "
                f"frac {first['sample_frac']}); sample every shard with the same flags"
            )
        if samples and sample.frames.shape[1] != samples[0].frames.shape[1]:
            raise InputError(f"{path}: dim {sample.frames.shape[1]} differs from {paths[0]}'s {samples[0].frames.shape[1]}")
        samples.append(sample)
    checks = [("--manifest", args.manifest, "manifest"), ("--mean-std", args.mean_std, "mean_std"),
              ("--checkpoint", args.checkpoint, "checkpoint")]
    for flag, given, key in checks:
        if not same_path(given, source.get(key)):
            raise InputError(f"{flag} {given} differs from the sample shards' {key} {source.get(key)}")
    if args.layer is not None and args.layer != source.get("layer"):
        raise InputError(f"--layer {args.layer} differs from the sample shards' layer {source.get('layer')}")
    frames = np.concatenate([s.frames for s in samples], axis=0)
    return frames, sum(s.utterances for s in samples), sum(s.source_frames for s in samples), first


@console_main
def main(argv: Optional[List[str]] = None) -> int:
    """Run learn_kmeans; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    started = time.perf_counter()
    split = args.split or split_name(args.manifest)
    sample_only = args.rank is not None
    from_shards = not sample_only and args.nshard > 1
    if (sample_only or from_shards) and not args.sample_dir:
        parser.error("--rank and --nshard > 1 need --sample-dir (where sample shards live)")
    if not sample_only and not args.km_path:
        parser.error("--km-path is required (except with --rank, which only samples)")
    if args.max_frames < 0:
        parser.error("--max-frames must be >= 0 (0 = no cap)")
    set_torch_threads(parser, args.threads)
    if not sample_only:
        backend = resolve_backend(args.backend)  # before sampling: a missing faiss is known now
    outputs = [sample_shard_path(args, split, args.rank)] if sample_only else [args.km_path]
    if from_shards:
        shard_paths = [sample_shard_path(args, split, rank) for rank in range(args.nshard)]
        inputs = [args.manifest] + shard_paths + [sidecar_path(path) for path in shard_paths]
    else:
        feature_source = feature_source_from_args(args)
        inputs = feature_source.input_files()
    # Fail before hours of sampling, not after.
    refuse_replacing_inputs(outputs + [sidecar_path(path) for path in outputs], inputs)
    for path in outputs:
        check_writable(path, args.overwrite)
        check_writable(sidecar_path(path), args.overwrite)

    sampling = {"sample_seed": args.seed, "sample_frac": args.sample_frac, "max_frames": args.max_frames}
    if from_shards:
        frames, utterances, source_frames, shard_meta = load_sample_shards(args, split)
        source = shard_meta["feature_source"]
        sampling = {key: shard_meta[key] for key in sampling}  # how the shards were drawn
    else:
        source = feature_source.describe()
        rank = args.rank if sample_only else 0
        sample = sample_frames(
            feature_source, args.nshard, rank, args.sample_frac,
            shard_max_frames(args.max_frames, args.nshard), args.seed, progress=not args.no_progress,
        )
        frames, utterances, source_frames = sample.frames, sample.utterances, sample.source_frames
        if sample_only:
            save_sample(outputs[0], sample, {
                "feature_source": source, "rank": rank, "nshard": args.nshard, **sampling,
            }, args.overwrite)
            print(
                f"sampled shard {rank}/{args.nshard}: {utterances} utterances "
                f"({hours(source_frames, source['frame_rate_hz']):.2f} h), {frames.shape[0]} of "
                f"{source_frames} frames kept, dim {frames.shape[1]}, in "
                f"{time.perf_counter() - started:.1f} s -> {outputs[0]}"
            )
            return 0

    if args.backend is None and backend != DEFAULT_BACKEND:
        # Only now, with every input read: a bad input stays one `error:` line whatever is installed.
        print(f"note: {DEFAULT_BACKEND} is not installed, fitting with {backend} "
              f"(pip install 'melhubert-fairseq[faiss]' for the faster {DEFAULT_BACKEND})", file=sys.stderr)
    print(f"fitting k-means: K={args.num_clusters}, {frames.shape[0]} frames x {frames.shape[1]} dims, "
          f"backend={backend}", file=sys.stderr)
    fit_started = time.perf_counter()
    centroids = fit_kmeans(
        frames, args.num_clusters, backend, args.seed, args.iterations, threads=args.threads
    )
    fit_seconds = time.perf_counter() - fit_started
    inertia = KMeansAssigner(centroids, threads=args.threads).inertia_per_frame(frames)
    model = KMeansModel(centroids, {
        "feature_source": source,
        "backend": backend,
        "iterations": args.iterations if args.iterations is not None else DEFAULT_ITERATIONS[backend],
        "seed": args.seed,  # k-means initialisation
        **sampling,
        "nshard": args.nshard,
        "utterances_sampled": utterances,
        "frames_used": int(frames.shape[0]),
        "inertia_per_frame": inertia,
        "fit_seconds": round(fit_seconds, 3),
    })
    save_kmeans(args.km_path, model, overwrite=args.overwrite)
    print(
        f"k-means K={args.num_clusters} dim={frames.shape[1]} ({backend}): {utterances} utterances "
        f"({hours(source_frames, source['frame_rate_hz']):.2f} h) sampled, {frames.shape[0]} frames fitted, "
        f"inertia/frame {inertia:.4f}, fit {fit_seconds:.1f} s, total {time.perf_counter() - started:.1f} s "
        f"-> {args.km_path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
