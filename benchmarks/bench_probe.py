"""Cost of the frozen probes: extracting the features against training the heads, and the probe during
pretraining against the training it rides on.

1. For each upstream (fbank, random init, pretrained) on the demo corpus (PR: train -> valid; SID: 2 per
   speaker -> the rest): seconds to extract the features once, seconds for one PR head and one SID head at the
   tool's default settings, and heads / extraction.
2. The probe during pretraining (``task.probe_train``): one fairseq-hydra-train run of the demo config on the
   demo run's features, probing at every validation (``task.probe_interval=1``) so each validation period is
   measured with and without its probe in the same run; the overhead at the default interval (10) is
   probe seconds / (10 x seconds of training and validation between two validations).

    python benchmarks/bench_probe.py --demo-run demo_run        # after the demo (its checkpoint and features)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "demo" / "corpus"


def heads_vs_extraction(checkpoint: str) -> list:
    """Part 1: (upstream, extraction s, PR head s, SID head s) on the demo corpus."""
    from melhubert_fairseq.probe.features import FBANK, PRETRAINED, RANDOM_INIT, extract_probe_features, load_upstream
    from melhubert_fairseq.probe.run import check_probe_data, load_probe_data, run_pr, run_sid

    data = load_probe_data([str(CORPUS / "train.tsv")], [str(CORPUS / "valid.tsv")], ("pr", "sid"), str(CORPUS / "phones.map"))
    check_probe_data(data, ("pr", "sid"), 2)
    rows = []
    for name in (FBANK, RANDOM_INIT, PRETRAINED):
        upstream = load_upstream(name, checkpoint)
        start = time.perf_counter()
        features = extract_probe_features(upstream, data.rows, True, True, progress=False)
        extracted = time.perf_counter()
        run_pr(features, data, [1])
        pr_done = time.perf_counter()
        run_sid(features, data, [1], 2)
        rows.append((name, extracted - start, pr_done - extracted, time.perf_counter() - pr_done))
    return rows


def training_overhead(demo_run: Path, updates: int, validate_every: int, out: Path, overrides: list, config_name: str) -> tuple:
    """Part 2: (probe seconds per probe, training + validation seconds per validation period) from one run."""
    command = [
        sys.executable, "-m", "fairseq_cli.hydra_train", "--config-dir", str(REPO / "config"), "--config-name", config_name,
        f"common.user_dir={REPO / 'melhubert_fairseq'}", f"task.data={demo_run / 'features'}",
        f"task.label_dir={demo_run / 'labels'}", f"checkpoint.save_dir={out / 'checkpoints'}", f"hydra.run.dir={out}",
        f"optimization.max_update={updates}", f"dataset.validate_interval_updates={validate_every}",
        "dataset.validate_interval=1000", "checkpoint.save_interval_updates=0", "checkpoint.no_save=true",
        f"task.probe_train={CORPUS / 'train.tsv'}", f"task.probe_test={CORPUS / 'valid.tsv'}",
        f"task.probe_phone_map={CORPUS / 'phones.map'}", "task.probe_interval=1", *overrides,
    ]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    log = result.stdout + result.stderr
    if result.returncode != 0:
        raise SystemExit(f"training failed:\n{log[-3000:]}")
    probes = [float(s) for s in re.findall(r"probe of the model in training in ([0-9.]+) s", log)]
    validations = len(re.findall(r"\]\[valid\]\[INFO\] - \{", log))
    # fairseq's own training time (updates, validations and probes; not its start-up or the data loading before it)
    trained = float(re.findall(r"done training in ([0-9.]+) seconds", log)[-1])
    period = (trained - sum(probes)) / max(validations, 1)
    return sum(probes) / len(probes), period, len(probes), validations, wall


def main() -> None:
    """Run both parts and print their tables with the ratios."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo-run", default=str(REPO / "demo_run"), help="a finished demo's --out-dir")
    parser.add_argument("--updates", type=int, default=60, help="part 2: training updates")
    parser.add_argument("--validate-every", type=int, default=20, help="part 2: updates between validations")
    parser.add_argument("--config-name", default="demo", help="part 2: the pretraining config (demo: 3 x 192; stage1: Base 12 x 768)")
    parser.add_argument("--skip-training", action="store_true", help="part 1 only")
    parser.add_argument("--skip-heads", action="store_true", help="part 2 only")
    parser.add_argument("overrides", nargs="*", help="part 2: extra fairseq overrides, e.g. task.probe_pr_steps=100")
    args = parser.parse_args()
    demo_run = Path(args.demo_run).resolve()
    checkpoint = str(demo_run / "checkpoints" / "checkpoint_last.pt")
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    if not args.skip_heads:
        print("| upstream | extract features (s) | one PR head (s) | one SID head (s) | heads / extraction |\n|---|---|---|---|---|")
        for name, extract, pr, sid in heads_vs_extraction(checkpoint):
            print(f"| {name} | {extract:.1f} | {pr:.1f} | {sid:.1f} | {(pr + sid) / extract:.1f}x |", flush=True)
    if args.skip_training:
        return
    probe, period, probes, validations, wall = training_overhead(
        demo_run, args.updates, args.validate_every, demo_run / "bench_probe_training", args.overrides, args.config_name
    )
    print(json.dumps({"updates": args.updates, "validations": validations, "probes": probes, "wall_s": round(wall, 1)}))
    print(
        f"probe: {probe:.1f} s; training + validation between two validations ({args.validate_every} updates): "
        f"{period:.1f} s; overhead at task.probe_interval=10: {probe / (10 * period):.1%}, at every validation: "
        f"{probe / period:.1%}"
    )
    per_update = period / args.validate_every
    print(
        f"per update: {per_update:.2f} s (with validation); under 5% at task.probe_interval=10 once a validation "
        f"period holds {probe / (0.05 * 10 * per_update):.0f} updates of this size or more"
    )
    print(f"load average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
