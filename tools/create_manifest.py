"""Build ``{split}.tsv`` (and optionally ``{split}.km``) from folders of per-utterance ``.npy`` files.

For features that already exist as one ``(frames, dim)`` ``.npy`` per
utterance, e.g. the ``feature/`` folder the original release's preprocessing
wrote, with optional per-utterance label ``.npy`` int arrays (its
``cluster/`` folder). Frame counts come from the ``.npy`` headers only
(memory-mapped, never read). Utterance id = file stem; features and labels
are matched by id and every mismatch is reported by id and count.

Example::

    melhubert-create-manifest --feature-dir out/feature --label-dir out/cluster \\
        --out-dir data/libri360 --split train-clean-360
"""
from __future__ import annotations

import sys
import argparse
import os
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from melhubert_fairseq.output_guards import check_writable, refuse_replacing_inputs
from melhubert_fairseq.data.features import open_feature_file, open_npy
from melhubert_fairseq.data.frame_rates import label_stride
from melhubert_fairseq.data.label_import import ManifestRows, check_unique_ids, match_ids, write_label_outputs
from melhubert_fairseq.data.labels import check_num_classes
from melhubert_fairseq.data.manifest import write_manifest
from melhubert_fairseq.cli import add_label_arguments, console_main, report_skipped, summary_line, with_progress
from melhubert_fairseq.errors import InputError


def find_npy_files(folder: str) -> List[Tuple[str, str]]:
    """``(relative path, utterance id)`` of every ``.npy`` below ``folder``, sorted; hidden entries skipped."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"folder not found: {folder}")
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        # Hidden folders include the importers' staging folders (.name.partial).
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.endswith(".npy") and not name.startswith("."):
                rel_path = os.path.relpath(os.path.join(dirpath, name), folder)
                found.append((rel_path, name[: -len(".npy")]))
    found.sort()
    if not found:
        raise InputError(f"{folder}: no .npy files found")
    check_unique_ids([utt for _, utt in found], folder)
    return found


def scan_features(folder: str, files: Sequence[Tuple[str, str]]) -> np.ndarray:
    """Frames per feature file from its header (the shared feature check: float32/float16, 2-D, at
    least one frame, a regular file); every file must have the same dim."""
    frames = np.zeros(len(files), dtype=np.int64)
    first_dim: Optional[Tuple[int, str]] = None
    for i, (rel_path, utt_id) in enumerate(with_progress(files, desc="feature headers", unit="file", mininterval=1.0)):
        path = os.path.join(folder, rel_path)
        shape = open_feature_file(path, f"utterance {utt_id}").shape
        if first_dim is None:
            first_dim = (shape[1], rel_path)
        elif shape[1] != first_dim[0]:
            raise InputError(
                f"{path}: utterance {utt_id} has {shape[1]}-dim features but {first_dim[1]} has {first_dim[0]}"
            )
        frames[i] = shape[0]
    return frames


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface of the manifest builder."""
    parser = argparse.ArgumentParser(
        prog="melhubert-create-manifest",
        description="Write {split}.tsv (and {split}.km + dict.km.txt) from folders of per-utterance .npy files.",
    )
    parser.add_argument("--feature-dir", required=True, help="folder of (frames, dim) feature .npy files (searched recursively)")
    parser.add_argument("--out-dir", required=True, help="folder for {split}.tsv, {split}.km and dict.km.txt")
    parser.add_argument("--split", help="output name (default: the feature folder's name)")
    parser.add_argument(
        "--label-dir", help="folder of per-utterance 1-D integer label .npy files with the same file stems"
    )
    add_label_arguments(parser)
    parser.add_argument(
        "--skip-missing",
        action="store_true",
        help="leave out utterances without labels (listed, with a count) instead of failing",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    return parser


@console_main
def main(argv: Optional[Sequence[str]] = None) -> Dict[str, str]:
    """Build the manifest (and labels); return the paths written by kind."""
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    check_num_classes(args.num_classes)
    feature_dir = os.path.abspath(args.feature_dir)
    out_dir = os.path.abspath(args.out_dir)
    split = args.split or os.path.basename(feature_dir.rstrip(os.sep))
    manifest_path = os.path.join(out_dir, f"{split}.tsv")
    feature_files = find_npy_files(feature_dir)
    label_files = find_npy_files(os.path.abspath(args.label_dir)) if args.label_dir else None
    inputs = [os.path.join(feature_dir, rel) for rel, _ in feature_files]
    if label_files is not None:
        inputs += [os.path.join(os.path.abspath(args.label_dir), rel) for rel, _ in label_files]
    refuse_replacing_inputs([manifest_path], inputs)
    check_writable(manifest_path, args.overwrite)
    all_rows = ManifestRows(
        feature_dir,
        [rel for rel, _ in feature_files],
        scan_features(feature_dir, feature_files),
        [utt for _, utt in feature_files],
    )
    if label_files is None:
        write_manifest(manifest_path, feature_dir, zip(all_rows.rel_paths, all_rows.num_frames.tolist()), args.overwrite)
        written = {"manifest": manifest_path}
        rows = all_rows
    else:
        label_dir = os.path.abspath(args.label_dir)
        label_paths = {utt: os.path.join(label_dir, rel) for rel, utt in label_files}
        match = match_ids(all_rows.utt_ids, label_paths, feature_dir, label_dir, args.skip_missing)
        report_skipped(match.problems)
        rows = all_rows.select(match.keep)

        def read_labels(i: int) -> np.ndarray:
            path = label_paths[rows.utt_ids[i]]
            labels = np.array(open_npy(path, f"utterance {rows.utt_ids[i]}", what="label file"))
            # The original stored labels as 1-D arrays; accept a (frames, 1) column too.
            return labels.reshape(-1) if labels.ndim == 2 and labels.shape[1] == 1 else labels

        written = write_label_outputs(
            out_dir,
            split,
            rows,
            read_labels,
            label_dir,
            args.num_classes,
            args.overwrite,
            write_new_manifest=True,
            dropped=match.dropped_rows(),
            stride=label_stride(args.label_rate),
            inputs=inputs,
            progress=with_progress,
        )
    print(summary_line("listed", len(rows.utt_ids), int(rows.num_frames.sum()), time.perf_counter() - start, written))
    return written


if __name__ == "__main__":
    sys.exit(main())
