"""Import k-means labels from a Kaldi text ark (the original release's ``.bas``) as ``{split}.km``.

Input: a label scp (``utt_id <path>:<offset>``, each offset just past
``'utt_id '`` in a text ark whose line is the utterance's space-separated
cluster ids, one per 10 ms frame) and the ``{split}.tsv`` manifest the labels
must align with (utterance id = the ``.npy`` file stem).

Output, in ``--out-dir`` (default: the manifest's folder): ``{split}.km`` with
one line per manifest row in manifest order, and ``dict.km.txt``. With
``--skip-missing``, utterances without labels are dropped into a new
``{split}.tsv`` and listed (with a count) on stderr and in
``{split}.dropped.txt``.

Example::

    melhubert-import-kaldi-labels --manifest data/libri360/train-clean-360.tsv \\
        --label-scp libri-360/train-clean-360-k512-e10.bas.scp
"""
from __future__ import annotations

import sys
import argparse
import contextlib
import os
import time
from typing import Dict, Optional, Sequence

import numpy as np

from melhubert_fairseq.data.frame_rates import label_stride
from melhubert_fairseq.data.kaldi import ArkHandles, read_scp, read_text_ark_labels, resolve_ark_paths
from melhubert_fairseq.data.label_import import ManifestRows, check_unique_ids, match_ids, write_label_outputs
from melhubert_fairseq.data.labels import check_num_classes
from melhubert_fairseq.data.manifest import read_manifest
from melhubert_fairseq.cli import add_label_arguments, console_main, report_skipped, summary_line, with_progress


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface of the label importer."""
    parser = argparse.ArgumentParser(
        prog="melhubert-import-kaldi-labels",
        description="Convert Kaldi text-ark cluster labels (scp + ark) into a {split}.km aligned to a manifest.",
    )
    parser.add_argument("--manifest", required=True, help="the {split}.tsv the labels must align with")
    parser.add_argument(
        "--label-scp", required=True, help="label scp: 'utt_id <path>:<offset>' into a text ark of cluster ids"
    )
    parser.add_argument(
        "--ark-dir",
        help="folder holding the label ark when the path written in the scp does not exist "
        "(the scp's own folder is searched too)",
    )
    parser.add_argument("--out-dir", help="folder for {split}.km and dict.km.txt (default: the manifest's folder)")
    parser.add_argument("--split", help="output name (default: the manifest file name without .tsv)")
    add_label_arguments(parser)
    parser.add_argument(
        "--skip-missing",
        action="store_true",
        help="drop utterances that lack labels (writing a new {split}.tsv) instead of failing; drops are listed",
    )
    parser.add_argument(
        "--skip-key-check",
        action="store_true",
        help="do not check that each scp offset points just past 'utt_id ' in its ark",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    return parser


@console_main
def main(argv: Optional[Sequence[str]] = None) -> Dict[str, str]:
    """Run the label import; return the paths written by kind."""
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    check_num_classes(args.num_classes)
    manifest = read_manifest(args.manifest)
    out_dir = os.path.abspath(args.out_dir or os.path.dirname(os.path.abspath(args.manifest)))
    split = args.split or os.path.basename(args.manifest).removesuffix(".tsv")

    utt_ids = [manifest.utterance_id(i) for i in range(len(manifest))]
    check_unique_ids(utt_ids, args.manifest)
    entries = read_scp(args.label_scp)
    resolved = resolve_ark_paths(entries, args.label_scp, args.ark_dir)
    by_utt = {entry.utt_id: entry for entry in entries}
    match = match_ids(utt_ids, by_utt, args.manifest, args.label_scp, args.skip_missing)
    report_skipped(match.problems)

    all_rows = ManifestRows(
        manifest.root,
        [manifest.relative_path(i) for i in range(len(manifest))],
        manifest.num_frames,
        utt_ids,
    )
    rows = all_rows.select(match.keep)
    dropped = match.dropped_rows()
    with contextlib.closing(ArkHandles()) as handles:

        def read_labels(i: int) -> np.ndarray:
            entry = by_utt[rows.utt_ids[i]]
            ark_path = resolved[entry.written_path]
            return read_text_ark_labels(
                handles.get(ark_path), entry.offset, entry.utt_id, ark_path, not args.skip_key_check
            )

        written = write_label_outputs(
            out_dir,
            split,
            rows,
            read_labels,
            args.label_scp,
            args.num_classes,
            args.overwrite,
            write_new_manifest=bool(match.no_labels),
            dropped=dropped,
            stride=label_stride(args.label_rate),
            inputs=[args.manifest, args.label_scp, *resolved.values()],
            progress=with_progress,
        )
    print(summary_line("labelled", len(rows.utt_ids), int(rows.num_frames.sum()), time.perf_counter() - start, written))
    return written


if __name__ == "__main__":
    sys.exit(main())
