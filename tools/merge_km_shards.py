"""Concatenate ``{split}_{rank}_{nshard}.km`` shards into ``{split}.km``, checking them against the manifest.

Every shard must exist, hold exactly its shard's rows, and every line must
hold one label per frame at ``--label-rate-hz`` (100 for fbank labels, the
model's rate, e.g. 50, for stage-2 labels), so the merged file lines up with
the manifest row for row.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from typing import List, Optional

import numpy as np

from melhubert_fairseq.atomic_output import atomic_output
from melhubert_fairseq.output_guards import check_writable, refuse_replacing_inputs
from melhubert_fairseq.data.features import FBANK_FRAME_RATE_HZ
from melhubert_fairseq.data.frame_rates import expected_label_count, label_stride
from melhubert_fairseq.data.labels import index_label_file
from melhubert_fairseq.data.manifest import read_manifest
from melhubert_fairseq.data.shards import shard_file_name, shard_range, split_name
from melhubert_fairseq.cli import console_main, with_progress
from melhubert_fairseq.errors import InputError


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags of merge_km_shards."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True, help="the {split}.tsv the shards were labelled from")
    parser.add_argument("--label-dir", required=True, help="directory holding the {split}_{rank}_{nshard}.km shards")
    parser.add_argument("--nshard", type=int, required=True, help="number of shards the labels were dumped in")
    parser.add_argument("--split", help="split name of the shard files (default: manifest file name)")
    parser.add_argument("--label-rate-hz", type=float, default=FBANK_FRAME_RATE_HZ, help="labels per second: 100 for fbank labels, the model frame rate (e.g. 50) for stage 2")
    parser.add_argument("--out", help="merged label file (default: LABEL_DIR/{split}.km)")
    parser.add_argument("--no-progress", action="store_true", help="hide the tqdm progress bar")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing merged file")
    return parser


def check_shard(path: str, expected_counts: np.ndarray, first_row: int, manifest) -> None:
    """Check a shard has one line per row and the right number of labels on each line."""
    index = index_label_file(path)
    if len(index) != len(expected_counts):
        raise InputError(f"{path}: has {len(index)} lines but its shard holds {len(expected_counts)} manifest rows")
    bad = np.flatnonzero(index.counts != expected_counts)
    if bad.size:
        line = int(bad[0])
        raise InputError(
            f"{path}:{line + 1}: {index.counts[line]} labels but {expected_counts[line]} expected for "
            f"[{manifest.describe(first_row + line)}] ({bad.size} such lines)"
        )


@console_main
def main(argv: Optional[List[str]] = None) -> int:
    """Run merge_km_shards; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    started = time.perf_counter()
    split = args.split or split_name(args.manifest)
    out_path = args.out or os.path.join(args.label_dir, f"{split}.km")
    shards = [os.path.join(args.label_dir, shard_file_name(split, r, args.nshard, ".km")) for r in range(args.nshard)]
    refuse_replacing_inputs([out_path], [args.manifest] + shards)
    check_writable(out_path, args.overwrite)
    try:
        stride = label_stride(args.label_rate_hz)
    except ValueError as err:
        parser.error(f"--label-rate-hz: {err}")
    manifest = read_manifest(args.manifest)
    expected = expected_label_count(manifest.num_frames, stride)
    missing = [p for p in shards if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {args.nshard} label shards are missing: {missing[:5]}")
    for rank, path in enumerate(with_progress(shards, desc="check shards", unit="shard", disable=args.no_progress)):
        start, end = shard_range(len(manifest), args.nshard, rank)
        check_shard(path, expected[start:end], start, manifest)
    with atomic_output(out_path, overwrite=args.overwrite, mode="wb") as out:
        for path in with_progress(shards, desc="merge", unit="shard", disable=args.no_progress):
            with open(path, "rb") as shard:
                shutil.copyfileobj(shard, out, length=1 << 24)
    merged = index_label_file(out_path)  # re-read: the merged file is what training will index
    if len(merged) != len(manifest):
        os.unlink(out_path)
        raise RuntimeError(f"{out_path}: merged {len(merged)} lines but {args.manifest} has {len(manifest)} rows")
    frames = int(manifest.num_frames.sum())
    print(
        f"merged {args.nshard} shards: {len(manifest)} utterances ({frames / FBANK_FRAME_RATE_HZ / 3600:.2f} h, {frames} fbank "
        f"frames), {int(merged.counts.sum())} labels, in {time.perf_counter() - started:.1f} s -> {out_path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
