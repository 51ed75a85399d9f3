"""The whole Mel-HuBERT stage-1 pipeline on the bundled demo corpus, on CPU, in minutes.

demo/corpus (FLAC) -> fbank + mean/std + manifests -> k-means labels -> fairseq-hydra-train
with config/demo.yaml -> a summary of where checkpoints and logs went and how well the
model predicts the masked frames' clusters compared with chance.
"""
import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from melhubert_fairseq.tools import dump_km_labels, learn_kmeans, wav_to_fbank
from melhubert_fairseq.cli import console_main

REPO_ROOT = Path(__file__).resolve().parents[1]
CORPUS_DIR = REPO_ROOT / "demo" / "corpus"
SPLITS = ("train", "valid")


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags of the demo."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default=str(REPO_ROOT / "demo_run"), help="where features, labels, checkpoints and logs go")
    parser.add_argument("--num-clusters", type=int, default=100, help="K of the stage-1 k-means on fbank")
    parser.add_argument("--max-update", type=int, help="override config/demo.yaml's optimization.max_update")
    parser.add_argument("--min-accuracy-ratio", type=float, default=5.0, help="fail unless final masked accuracy exceeds this many times chance (0 = no check)")
    parser.add_argument("--workers", type=int, default=2, help="processes for the fbank extraction")
    parser.add_argument("--overwrite", action="store_true", help="delete an existing --out-dir first")
    parser.add_argument("overrides", nargs="*", help="extra fairseq-hydra-train overrides, e.g. model.encoder_layers=2")
    return parser


def last_metrics(log_path: Path, tag: str) -> Optional[Dict[str, str]]:
    """The last json metrics line fairseq logged under ``[tag]`` (train, valid, train_inner)."""
    found = None
    pattern = re.compile(rf"\]\[{tag}\]\[INFO\] - (\{{.*\}})")
    with open(log_path, encoding="utf-8") as handle:
        for line in handle:
            match = pattern.search(line)
            if match:
                found = json.loads(match.group(1))
    return found


def make_features(out: Path, workers: int) -> Path:
    """fbank for both splits; valid is normalised with the train statistics."""
    feature_dir = out / "features"
    wav_to_fbank.main(["--manifest", str(CORPUS_DIR / "train.tsv"), "--out-dir", str(feature_dir), "--workers", str(workers)])
    wav_to_fbank.main([
        "--manifest", str(CORPUS_DIR / "valid.tsv"), "--out-dir", str(feature_dir),
        "--mean-std", str(feature_dir / "mean-std.npy"),
    ])
    return feature_dir


def make_labels(out: Path, feature_dir: Path, num_clusters: int) -> Path:
    """Stage-1 labels: k-means of the train fbank frames, assigned to every frame of both splits."""
    centroids = out / "kmeans" / f"fbank-k{num_clusters}.npy"
    label_dir = out / "labels"
    learn_kmeans.main([
        "--manifest", str(feature_dir / "train.tsv"), "--km-path", str(centroids),
        "--num-clusters", str(num_clusters), "--sample-frac", "1.0",
    ])
    for split in SPLITS:
        dump_km_labels.main([
            "--manifest", str(feature_dir / f"{split}.tsv"), "--km-path", str(centroids), "--out-dir", str(label_dir),
        ])
    return label_dir


def train(out: Path, feature_dir: Path, label_dir: Path, num_clusters: int, max_update: Optional[int], overrides: List[str]) -> Path:
    """Run fairseq-hydra-train with config/demo.yaml from the repo root; return its log file."""
    hydra_dir = out / "hydra"
    command = [
        sys.executable, "-m", "fairseq_cli.hydra_train", "--config-dir", "config", "--config-name", "demo",
        "common.user_dir=melhubert_fairseq",
        f"task.data={feature_dir}", f"task.label_dir={label_dir}", f"task.num_classes={num_clusters}",
        f"checkpoint.save_dir={out / 'checkpoints'}", f"hydra.run.dir={hydra_dir}",
        *([f"optimization.max_update={max_update}"] if max_update else []),
        *overrides,
    ]
    print("+ " + " ".join(command), flush=True)
    subprocess.run(command, cwd=REPO_ROOT, check=True)
    return hydra_dir / "hydra_train.log"


@console_main
def main(argv: Optional[List[str]] = None) -> int:
    """Run the demo end to end; return 0 when the model learned (accuracy above the threshold)."""
    args = build_parser().parse_args(argv)
    out = Path(args.out_dir).resolve()
    if out.exists():
        if not args.overwrite:
            raise SystemExit(f"{out} already exists: pass --overwrite to start the demo again from scratch")
        shutil.rmtree(out)
    start = time.time()
    feature_dir = make_features(out, args.workers)
    label_dir = make_labels(out, feature_dir, args.num_clusters)
    log_path = train(out, feature_dir, label_dir, args.num_clusters, args.max_update, args.overrides)

    chance = 1.0 / args.num_clusters
    train_metrics = last_metrics(log_path, "train") or {}
    valid_metrics = last_metrics(log_path, "valid") or {}
    train_acc = float(train_metrics.get("train_acc_m", "nan"))
    valid_acc = float(valid_metrics.get("valid_acc_m", "nan"))
    print(
        f"demo finished in {time.time() - start:.0f} s: {train_metrics.get('train_num_updates', '?')} updates; "
        f"masked accuracy train {train_acc:.3f} ({train_acc / chance:.1f}x chance), "
        f"valid {valid_acc:.3f} ({valid_acc / chance:.1f}x chance), chance = 1/{args.num_clusters}\n"
        f"  checkpoints: {out / 'checkpoints'}\n  log: {log_path}\n  features: {feature_dir}\n  labels: {label_dir}"
    )
    if args.min_accuracy_ratio and not train_acc > args.min_accuracy_ratio * chance:
        print(f"masked accuracy is not above {args.min_accuracy_ratio:g}x chance: the model did not learn", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
