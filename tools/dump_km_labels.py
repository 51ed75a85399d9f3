"""Label every frame of a manifest with its nearest k-means centroid (``{split}.km`` + ``dict.km.txt``).

Stage 1 labels each 10 ms fbank frame; stage 2 (``--checkpoint CKPT --layer L``)
labels each model frame of that layer. With ``--nshard N --rank R`` only shard
R is labelled into ``{split}_{R}_{N}.km``; merge the shards with
``merge_km_shards``.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from typing import List, Optional


from melhubert_fairseq.atomic_output import atomic_output
from melhubert_fairseq.output_guards import check_writable, refuse_replacing_inputs
from melhubert_fairseq.data.features import FBANK_FRAME_RATE_HZ
from melhubert_fairseq.data.labels import KM_DICTIONARY_NAME, LabelLineFormatter, dictionary_needs_writing, write_dictionary
from melhubert_fairseq.data.shards import shard_file_name, shard_range, split_name
from melhubert_fairseq.kmeans import (
    IMPORTED_SOURCE_KIND,
    KMeansAssigner,
    add_feature_source_arguments,
    feature_source_from_args,
    load_kmeans,
    sidecar_path,
)
from melhubert_fairseq.cli import console_main, set_torch_threads, with_progress


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags of dump_km_labels."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True, help="{split}.tsv manifest of fbank .npy files to label")
    parser.add_argument("--km-path", required=True, help="centroids .npy written by learn_kmeans or import_kmeans (with its .json sidecar)")
    parser.add_argument("--out-dir", required=True, help="directory for {split}.km (or its shard) and dict.km.txt")
    parser.add_argument("--split", help="split name of the output file (default: manifest file name)")
    add_feature_source_arguments(parser)
    parser.add_argument("--chunk-frames", type=int, default=16384, help="frames per distance matmul (bounds memory)")
    parser.add_argument("--threads", type=int, help="CPU threads for the model and assignment (default: all)")
    parser.add_argument("--nshard", type=int, default=1, help="split the manifest into this many shards")
    parser.add_argument("--rank", type=int, default=0, help="which shard to label (0-based)")
    parser.add_argument("--no-progress", action="store_true", help="hide the tqdm progress bar")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    return parser


@console_main
def main(argv: Optional[List[str]] = None) -> int:
    """Run dump_km_labels; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    started = time.perf_counter()
    set_torch_threads(parser, args.threads)
    split = args.split or split_name(args.manifest)
    out_path = os.path.join(args.out_dir, shard_file_name(split, args.rank, args.nshard, ".km"))
    dict_path = os.path.join(args.out_dir, KM_DICTIONARY_NAME)
    model = load_kmeans(args.km_path)  # first: a file that is no k-means model is named as such
    source = feature_source_from_args(args)
    refuse_replacing_inputs(
        [out_path, dict_path], itertools.chain([args.km_path, sidecar_path(args.km_path)], source.input_files())
    )
    check_writable(out_path, args.overwrite)
    # Before labelling: a dictionary for another K fails now, not after the whole shard.
    write_dict = dictionary_needs_writing(dict_path, model.num_clusters, args.overwrite, "the k-means model has")
    trained_on = model.metadata.get("feature_source", {})
    known = trained_on.get("kind") != IMPORTED_SOURCE_KIND  # fairseq's models do not say what they clustered
    if known and (trained_on.get("kind") != source.kind or trained_on.get("layer") != getattr(source, "layer", None)):
        print(f"warning: {args.km_path} was learned on {trained_on}, labelling {source.describe()}", file=sys.stderr)
    start, end = shard_range(len(source.manifest), args.nshard, args.rank)
    assigner = KMeansAssigner(
        model.centroids, device=args.device, chunk_frames=args.chunk_frames, threads=args.threads
    )
    format_line = LabelLineFormatter(model.num_clusters)
    labels_written = 0
    with atomic_output(out_path, overwrite=args.overwrite) as handle:
        pairs = source.iter_shard(args.nshard, args.rank)
        for row, labels in with_progress(
            assigner.label_utterances(pairs, source.where), total=end - start,
            desc=f"label {split} {args.rank}/{args.nshard}", unit="utt", disable=args.no_progress,
        ):
            handle.write(format_line(labels))
            labels_written += len(labels)
        # Before the labels are renamed into place: a kill in between leaves the
        # dictionary alone, never labels without their dictionary.
        if write_dict:
            write_dictionary(dict_path, model.num_clusters, overwrite=True)
    seconds = time.perf_counter() - started
    audio_frames = int(source.manifest.num_frames[start:end].sum())
    print(
        f"labelled {end - start} utterances ({audio_frames / FBANK_FRAME_RATE_HZ / 3600:.2f} h, {audio_frames} fbank frames): "
        f"{labels_written} labels at {source.frame_rate_hz:g} Hz, K={model.num_clusters}, in {seconds:.1f} s "
        f"({labels_written / max(seconds, 1e-9):.0f} frames/s) -> {out_path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
