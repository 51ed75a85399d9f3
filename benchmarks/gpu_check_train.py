"""Stage 2 of gpu_check.py: mixed-precision training through fairseq-hydra-train.

``config/stage1.yaml`` (Base, 12 x 768, 20 ms) for ``--updates`` updates on a synthetic corpus whose
labels follow its features, once with ``common.bf16=true`` and once with ``common.fp16=true``: the loss
must fall, stay finite, and fp16 may skip no more than fairseq's first few updates for gradient
overflow; the checkpoint of each run must load on the CPU and give the device's outputs.
Standard library only at import, like gpu_check.py: the preflight reports missing packages first.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from gpu_check_common import QUICK_SIZES, REPO_ROOT, Budget, log

#: fairseq skips the updates whose fp16 gradients overflow while its loss scale settles.
MAX_OVERFLOW_SKIPS = 5


def write_learnable_corpus(directory: Path, num_utts: int, num_frames: int, num_classes: int, seed: int = 0) -> Path:
    """A synthetic fbank corpus whose k-means-like labels follow its features.

    Each utterance is a run of segments of 8-30 frames (10 ms each); a segment's frames
    are its class's 40-dim centroid plus noise and carry that class as label. A masked
    frame's label can thus be inferred from its unmasked neighbours: the --quick model
    gets below chance (log2 of the class count) in its 16 updates; Base at the recipe's
    learning rate falls from about chance + 0.3 bits to about chance in 100 (measured
    on CPU: 9.31 -> 9.11 bits over 60 updates of 2 crops).
    """
    import numpy as np

    from melhubert_fairseq.atomic_output import atomic_save_npy
    from melhubert_fairseq.data.features import FBANK_NUM_MEL_BINS
    from melhubert_fairseq.data.labels import KM_DICTIONARY_NAME, write_dictionary, write_km
    from melhubert_fairseq.data.manifest import write_manifest

    rng = np.random.default_rng(seed)
    centroids = rng.standard_normal((num_classes, FBANK_NUM_MEL_BINS)).astype(np.float32)
    feature_dir = directory / "feats"
    feature_dir.mkdir(parents=True, exist_ok=True)
    rows, labels = [], []
    for index in range(num_utts):
        lengths = rng.integers(8, 31, size=num_frames // 8 + 1)
        classes = np.repeat(rng.integers(0, num_classes, size=len(lengths)), lengths)[:num_frames]
        features = centroids[classes] + 0.5 * rng.standard_normal((num_frames, FBANK_NUM_MEL_BINS)).astype(np.float32)
        atomic_save_npy(str(feature_dir / f"utt{index:04d}.npy"), features.astype(np.float32))
        rows.append((f"utt{index:04d}.npy", num_frames))
        labels.append(classes)
    write_manifest(str(directory / "train.tsv"), str(feature_dir), rows)
    write_km(str(directory / "train.km"), labels)
    write_dictionary(str(directory / KM_DICTIONARY_NAME), num_classes)
    return directory


def train_inner_lines(text: str) -> List[Dict[str, str]]:
    """fairseq's json ``train_inner`` log records, in order."""
    return [json.loads(m) for m in re.findall(r"\[train_inner\]\[INFO\] - (\{.*\})", text)]


def loss_summary(records: List[Dict[str, str]], num_classes: int) -> Dict:
    """Mean loss (bits per masked frame) over the first and the last tenth of updates, and the verdicts."""
    losses = [float(r["loss"]) for r in records]
    window = max(1, min(10, len(losses) // 4))
    first, last = statistics.fmean(losses[:window]), statistics.fmean(losses[-window:])
    return {
        "window": window,
        "first_loss": round(first, 3),
        "last_loss": round(last, 3),
        "chance_loss": round(math.log2(num_classes), 3),
        "last_acc_m": float(records[-1].get("acc_m", "nan")),
        "finite": all(math.isfinite(v) for v in losses),
        "falls": last < first,
    }


def training_command(args, data: Path, save_dir: Path, precision_overrides: Sequence[str]) -> List[str]:
    """``fairseq-hydra-train`` on config/stage1.yaml as the README runs it, sized for a short check."""
    # The tiny model learns in a few updates at 10x the recipe's learning rate.
    quick = [f"model.{k}={v}" for k, v in QUICK_SIZES.items()]
    quick += ["task.max_sample_size=100", "dataset.max_tokens=400", "optimization.lr=[0.001]"]
    return [
        sys.executable, "-m", "fairseq_cli.hydra_train",
        "--config-dir", "config", "--config-name", "stage1",
        "common.user_dir=melhubert_fairseq",
        f"task.data={data}", f"task.label_dir={data}", f"task.num_classes={args.train_classes}",
        f"optimization.max_update={args.updates}",
        "optimization.update_freq=[1]",  # one GPU step per update: ~100 updates fit the time budget
        f"dataset.num_workers={0 if args.device == 'cpu' else 2}",
        "common.log_interval=1",
        "common.tensorboard_logdir=null",
        "dataset.disable_validation=true",  # the synthetic corpus has no valid split
        f"checkpoint.save_dir={save_dir}",
        "checkpoint.no_epoch_checkpoints=true",
        f"hydra.run.dir={save_dir}/hydra",
        *(["common.cpu=true"] if args.device == "cpu" else []),
        *(quick if args.quick else []),
        *precision_overrides,
    ]


def precision_overrides(precision: str, device: str) -> Tuple[List[str], Optional[str]]:
    """fairseq overrides for ``precision`` on ``device`` and a note when CPU needs something else."""
    if precision == "bf16":
        return ["common.bf16=true"], None
    if device == "cpu":
        # fairseq's FP16Optimizer allocates its flat fp32 master copy on CUDA; unflattened it runs on CPU.
        return ["common.fp16=true", "common.fp16_no_flatten_grads=true"], (
            "CPU: common.fp16_no_flatten_grads=true added (fairseq's flattened FP16Optimizer allocates its fp32 master "
            "weights with torch.cuda.current_device() and fails without CUDA)"
        )
    return ["common.fp16=true"], None


def checkpoint_round_trip(checkpoint: Path, device: str) -> Dict:
    """Load a checkpoint on the CPU and on ``device``; relative difference of their final-layer outputs in fp32."""
    import numpy as np
    import torch

    from melhubert_fairseq.feature_reader import MelHubertFeatureReader

    readers = {"cpu": MelHubertFeatureReader(str(checkpoint), device="cpu")}
    readers[device] = MelHubertFeatureReader(str(checkpoint), device=device)
    inputs = [np.random.default_rng(0).standard_normal((200, readers["cpu"].feat_dim * readers["cpu"].stack)).astype(np.float32)]
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        outputs = {name: reader.hidden_states(inputs)[0][-1] for name, reader in readers.items()}
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    difference = float((outputs[device] - outputs["cpu"]).norm() / outputs["cpu"].norm())
    return {"relative_difference": difference, "ok": math.isfinite(difference) and difference < 1e-4}


def run_training(args, precision: str, data: Path, work: Path, budget: Budget) -> Dict:
    """One fairseq-hydra-train run at ``precision`` (bf16 or fp16) and its verdicts."""
    overrides, note = precision_overrides(precision, args.device)
    save_dir = work / f"train_{precision}"
    command = training_command(args, data, save_dir, overrides)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.device == "cpu":
        env["OMP_NUM_THREADS"] = str(args.threads)
    log(f"[train {precision}] fairseq-hydra-train stage1 {' '.join(overrides)}, {args.updates} updates")
    started = time.perf_counter()
    timeout = max(30.0, min(args.train_timeout, budget.left()))
    try:
        result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"did not finish in {timeout:.0f} s", "overrides": overrides}
    seconds = time.perf_counter() - started
    text = result.stdout + result.stderr
    records = train_inner_lines(result.stdout)
    report: Dict = {"overrides": overrides, "returncode": result.returncode, "seconds": round(seconds, 1)}
    if note:
        report["note"] = note
    if result.returncode != 0 or not records:
        report.update(ok=False, error="fairseq-hydra-train failed", output_tail=text[-3000:])
        log(f"[train {precision}] FAILED (exit {result.returncode}):\n{text[-1500:]}")
        return report
    updates = [int(r["num_updates"]) for r in records]
    overflows = len(re.findall(r"gradient overflow detected", text))
    report.update(loss_summary(records, args.train_classes))
    report.update(
        updates=updates[-1],
        all_updates_logged=updates == list(range(1, args.updates + 1)),
        overflow_skips=overflows,
        loss_scale=records[-1].get("loss_scale"),
        # fairseq's "wall": seconds since the trainer started (data loading and start-up included).
        updates_per_second=round(args.updates / max(float(records[-1].get("wall", 0)) or seconds, 1e-9), 2),
        loss_curve=[float(r["loss"]) for r in records],
    )
    checks = {
        "finished": report["all_updates_logged"],
        "finite": report["finite"],
        "loss falls": report["falls"],
        "overflow skips": overflows <= MAX_OVERFLOW_SKIPS,
    }
    checkpoint = save_dir / "checkpoint_last.pt"
    if checkpoint.exists():
        report["checkpoint_on_cpu"] = checkpoint_round_trip(checkpoint, args.device)
        checks["checkpoint loads on cpu"] = report["checkpoint_on_cpu"]["ok"]
    else:
        checks["checkpoint loads on cpu"] = False
    report["checks"] = checks
    report["ok"] = all(checks.values())
    log(
        f"[train {precision}] loss {report['first_loss']} -> {report['last_loss']} bits (chance {report['chance_loss']}), "
        f"acc_m {report['last_acc_m']}, {overflows} overflow skips, {seconds:.0f} s: "
        + ("ok" if report["ok"] else "FAILED " + ", ".join(k for k, v in checks.items() if not v))
    )
    shutil.rmtree(save_dir, ignore_errors=True)  # Base checkpoints are ~1 GB each
    return report


def run_train_stage(args, budget: Budget, work: Path) -> Dict:
    """The bf16 and fp16 fairseq runs on one synthetic corpus."""
    # 10 ms frames; stage1 drops utterances under 160 model frames and crops to 750 (quick: 100).
    frames = 360 if args.quick else 1600
    data = write_learnable_corpus(work / "corpus", num_utts=16 if args.quick else 128, num_frames=frames, num_classes=args.train_classes)
    runs = {}
    for precision in ("bf16", "fp16"):
        if budget.left() < 20:
            runs[precision] = {"ok": False, "error": "skipped: time budget spent"}
            continue
        runs[precision] = run_training(args, precision, data, work, budget)
    return {"ok": all(r["ok"] for r in runs.values()), "runs": runs}
