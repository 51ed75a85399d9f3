"""Convert a fairseq ``simple_kmeans`` k-means model (joblib) into this project's pickle-free k-means files.

fairseq's ``examples/hubert/simple_kmeans/learn_kmeans.py`` saves a scikit-learn
MiniBatchKMeans with ``joblib.dump``: a pickle, and loading a pickle runs
whatever code it holds. This tool unpickles the file only with
``--trust-pickle`` and writes its cluster centres as ``--km-path`` (float32
``.npy``) with a ``.json`` sidecar, the format ``melhubert-learn-kmeans``
writes and ``melhubert-dump-km-labels`` reads without unpickling anything.

    melhubert-import-kmeans --joblib hubert_base_ls960_L9_km500.bin --km-path km/L9_k500.npy --trust-pickle
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from melhubert_fairseq.output_guards import check_writable, refuse_replacing_inputs
from melhubert_fairseq.cli import console_main
from melhubert_fairseq.errors import InputError, check_regular_file
from melhubert_fairseq.kmeans import read_simple_kmeans_joblib, save_kmeans, sidecar_path


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags of import_kmeans."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--joblib", required=True, help="k-means model written by fairseq's simple_kmeans/learn_kmeans.py (a joblib pickle)")
    parser.add_argument("--km-path", required=True, help="output centroids .npy (a .json sidecar is written beside it)")
    parser.add_argument("--trust-pickle", action="store_true", help="unpickle the joblib file; only for files you trust (unpickling runs any code the file holds)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    return parser


@console_main
def main(argv: Optional[List[str]] = None) -> int:
    """Run import_kmeans; return the exit status."""
    args = build_parser().parse_args(argv)
    check_regular_file(args.joblib, what="joblib k-means model")
    if not args.trust_pickle:
        raise InputError(
            f"{args.joblib}: a joblib k-means model is a pickle, and unpickling runs any code it holds; "
            "pass --trust-pickle to unpickle it (only for files you trust)"
        )
    outputs = [args.km_path, sidecar_path(args.km_path)]
    refuse_replacing_inputs(outputs, [args.joblib])
    for path in outputs:  # before unpickling
        check_writable(path, args.overwrite)
    model, notes = read_simple_kmeans_joblib(args.joblib)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    save_kmeans(args.km_path, model, overwrite=args.overwrite)
    imported = model.metadata["imported_from"]
    print(
        f"imported K={model.num_clusters} dim={model.dim} centres of a {imported['class'].rsplit('.', 1)[-1]} "
        f"(scikit-learn {imported['sklearn_version']}) from {args.joblib} -> {args.km_path} "
        f"(+ {os.path.basename(sidecar_path(args.km_path))})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
